"""Disaggregated serving on the real default model: greedy output equals transformers token for
token with the KV moved over shm, over tcp and over NIXL (each asserted to be the backend that
moved the blocks), also when the decode worker already holds part of
the prompt (and then it pulls fewer blocks)."""

from __future__ import annotations

import pytest

from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIRST = [{"role": "user", "content": "What is the capital of France?"}]
FOLLOW_UP = [
    *FIRST,
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what is the capital of Italy? Answer in one short sentence."},
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def references(default_model_dir):
    """(prompt ids, greedy continuation ids) from transformers for both prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    out = []
    for messages in (FIRST, FOLLOW_UP):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        new = gen[0, len(ids) :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        out.append((list(ids), new))
    assert out[1][0][: len(out[0][0])] == out[0][0], "the follow-up must extend the first prompt"
    return out


@pytest.fixture(scope="module", params=["shm", "tcp", "nixl"])
def stack(request, tmp_path_factory, default_model_dir):
    s = Stack(
        tmp_path_factory.mktemp(f"disagg-{request.param}"),
        "--prefill", "1", "--decode", "1",
        f"--worker-arg=--kv-transfer={request.param}",
        "--router-arg=--local-prefill-max-tokens=16",
        engine="hf", timeout=240,
    )  # fmt: skip
    s.backend = request.param
    yield s
    s.stop()


def _complete(stack: Stack, prompt: list[int]):
    import openai

    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(
        model="default", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0
    )
    r = raw.parse()
    return r, route_workers(raw.headers["x-pdrouter-route"])


def test_greedy_equals_transformers_and_partial_prefix_pulls_less(stack, references, default_model_dir):
    from router.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_model_dir)
    (p1, want1), (p2, want2) = references

    r1, route1 = _complete(stack, p1)
    assert route1["mode"] == "disaggregated"
    assert r1.choices[0].text == tok.decode(want1)
    decode = route1["decode"]
    wait_for(lambda: worker_load(decode).kv_transfer.pulls == 1, what="first pull counted")
    first = worker_load(decode).kv_transfer
    assert first.pull_failures == 0 and first.blocks_pulled == -(-len(p1) // 16)
    assert dict(first.pulls_by_backend) == {stack.backend: 1}  # not a silent fallback

    r2, route2 = _complete(stack, p2)  # the decode worker holds p1's full blocks already
    assert route2["mode"] == "disaggregated" and route2["decode"] == decode
    assert r2.choices[0].text == tok.decode(want2)
    wait_for(lambda: worker_load(decode).kv_transfer.pulls == 2, what="second pull counted")
    second = worker_load(decode).kv_transfer
    pulled = second.blocks_pulled - first.blocks_pulled
    assert second.pull_failures == 0 and dict(second.pulls_by_backend) == {stack.backend: 2}
    assert pulled == -(-len(p2) // 16) - len(p1) // 16 < -(-len(p2) // 16)
    wait_for(
        lambda: worker_load(route1["prefill"]).kv_transfer.handles_pinned == 0,
        what="prefill handles released",
    )

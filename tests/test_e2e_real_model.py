"""The whole stack on the real default model: greedy chat equals transformers `generate`."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf_stack(tmp_path_factory, default_model_dir):
    from tests.procs import Stack

    stack = Stack(tmp_path_factory.mktemp("hf_stack"), "--both", "1", engine="hf", timeout=240)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def hf_reference(default_model_dir):
    """Greedy continuation from transformers itself, same prompt, 24 tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    if eos in new:
        new = new[: new.index(eos)]
    return ids["input_ids"][0].tolist(), new, tok.decode(new, skip_special_tokens=True)


def test_greedy_chat_equals_transformers(hf_stack, hf_reference) -> None:
    import grpc
    import openai

    from pdrouter_proto import inference_pb2 as ipb
    from pdrouter_proto import inference_pb2_grpc as ipb_grpc

    prompt_ids, ref_ids, ref_text = hf_reference
    client = openai.OpenAI(base_url=hf_stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content == ref_text
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ref_ids) + (
        1 if r.choices[0].finish_reason == "stop" else 0
    )
    with grpc.insecure_channel(f"127.0.0.1:{hf_stack.grpc_port}") as ch:
        stub = ipb_grpc.InferenceStub(ch)
        req = ipb.GenerateRequest(
            chat=ipb.ChatInput(messages=[ipb.ChatMessage(role="user", content=QUESTION[0]["content"])]),
            max_tokens=24,
            temperature=0,
        )
        ids = [
            t
            for resp in stub.Generate(req, timeout=120)
            if resp.WhichOneof("kind") == "chunk"
            for t in resp.chunk.token_ids
        ]
    assert ids[: len(ref_ids)] == ref_ids


def test_token_prompt_completion_matches(hf_stack, hf_reference, default_model_dir) -> None:
    """/v1/completions with the chat prompt as token ids: the same tokens as transformers' greedy
    `generate` on those ids (up to 8, its end-of-sequence token included), one by one and as text."""
    import openai
    from transformers import AutoTokenizer

    prompt_ids, ref_ids, _ = hf_reference
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    want = (ref_ids + [eos])[:8]  # NOTE: the reference stopped before eos; an answer under 8 ends with it
    client = openai.OpenAI(base_url=hf_stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.completions.create(model="default", prompt=prompt_ids, max_tokens=8, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == ("length" if len(ref_ids) >= 8 else "stop")
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(prompt_ids)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in want]
    assert choice.text == tok.decode(want, skip_special_tokens=True)

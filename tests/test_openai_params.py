"""Every request parameter through the official openai client, streaming and not.

Mock engine (deterministic: tokens are a function of the prompt and the seed), plus a few on the
real model where the parameter changes what a real sampler does (temperature, top_p, top_k, seed).
Each parameter is checked for its effect, not just accepted; `stream` runs every check both ways
and the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import openai
import pytest

from tests.procs import Stack

MODEL = "SmolLM2-135M-Instruct"
USER = [{"role": "user", "content": "Tell me about the parameters of a request."}]


@dataclass
class Result:
    """One response, streamed or not, in the same shape."""

    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    usage: object = None
    ids: set[str] = field(default_factory=set)
    objects: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    created: set[int] = field(default_factory=set)
    fingerprints: set[str | None] = field(default_factory=set)


def _meta(r: Result, resp) -> None:
    r.ids.add(resp.id)
    r.objects.add(resp.object)
    r.models.add(resp.model)
    r.created.add(resp.created)
    r.fingerprints.add(resp.system_fingerprint)


def chat(client: openai.OpenAI, stream: bool, **kw) -> Result:
    r = Result()
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", USER)
    if not stream:
        resp = client.chat.completions.create(**kw)
        _meta(r, resp)
        for c in resp.choices:
            r.texts[c.index], r.finish[c.index] = c.message.content, c.finish_reason
            r.logprobs[c.index] = c.logprobs.content if c.logprobs else []
        r.usage = resp.usage
        return r
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        _meta(r, chunk)
        if chunk.usage:
            assert not chunk.choices  # the usage chunk comes alone, last
            r.usage = chunk.usage
        for c in chunk.choices:
            r.texts[c.index] = r.texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                r.finish[c.index] = c.finish_reason
            if c.logprobs:
                r.logprobs.setdefault(c.index, []).extend(c.logprobs.content)
    return r


def complete(client: openai.OpenAI, stream: bool, **kw) -> Result:
    r = Result()
    kw.setdefault("model", MODEL)
    if not stream:
        resp = client.completions.create(**kw)
        _meta(r, resp)
        for c in resp.choices:
            r.texts[c.index], r.finish[c.index] = c.text, c.finish_reason
            r.logprobs[c.index] = c.logprobs
        r.usage = resp.usage
        return r
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        _meta(r, chunk)
        if chunk.usage:
            r.usage = chunk.usage
        for c in chunk.choices:
            r.texts[c.index] = r.texts.get(c.index, "") + c.text
            if c.finish_reason:
                r.finish[c.index] = c.finish_reason
            if c.logprobs:
                r.logprobs.setdefault(c.index, []).append(c.logprobs)
    return r


@pytest.fixture(scope="module")
def client(mock_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock_stack.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


both = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


# -- mock engine: every parameter, both ways ---------------------------------------------------


@pytest.mark.integration
@both
def test_response_envelope(client, stream: bool) -> None:
    r = chat(client, stream, max_tokens=5)
    assert len(r.ids) == 1 and next(iter(r.ids)).startswith("chatcmpl-")
    assert r.objects == {"chat.completion.chunk" if stream else "chat.completion"}
    assert r.models == {MODEL} and len(r.created) == 1 and next(iter(r.created)) > 1_700_000_000
    assert len(r.fingerprints) == 1 and next(iter(r.fingerprints))
    c = complete(client, stream, prompt="envelope", max_tokens=3)
    assert next(iter(c.ids)).startswith("cmpl-") and c.objects == {"text_completion"}


@pytest.mark.integration
@both
def test_roles_and_content_parts(client, stream: bool) -> None:
    convo = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Go on"},
    ]
    parts = [
        *convo[:3],
        {"role": "user", "content": [{"type": "text", "text": "Go"}, {"type": "text", "text": " on"}]},
    ]
    plain, split = (
        chat(client, stream, messages=convo, max_tokens=8),
        chat(client, stream, messages=parts, max_tokens=8),
    )
    assert plain.texts == split.texts and plain.usage.prompt_tokens == split.usage.prompt_tokens
    wordy = [
        {"role": "system", "content": "You are terse, and you answer in one short sentence."},
        *convo[1:],
    ]
    longer = chat(client, stream, messages=wordy, max_tokens=8)
    assert longer.usage.prompt_tokens > plain.usage.prompt_tokens  # the system turn is in the prompt


@pytest.mark.integration
@both
def test_prompt_forms(client, stream: bool) -> None:
    one = complete(client, stream, prompt="The sky is", max_tokens=6)
    ids = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=1, echo=True, logprobs=0)
    assert one.usage.prompt_tokens == ids.usage.prompt_tokens
    token_ids = [t for t in range(200, 200 + one.usage.prompt_tokens)]
    by_ids = complete(client, stream, prompt=token_ids, max_tokens=6)
    assert by_ids.usage.prompt_tokens == len(token_ids)
    many = complete(client, stream, prompt=["The sky is", "Grass is"], max_tokens=6)
    assert set(many.texts) == {0, 1} and many.texts[0] == one.texts[0] and many.texts[1] != many.texts[0]
    batch = complete(client, stream, prompt=[token_ids, [300, 301, 302]], max_tokens=6)
    assert batch.texts[0] == by_ids.texts[0] and batch.usage.prompt_tokens == len(token_ids) + 3


@pytest.mark.integration
@both
def test_max_tokens_and_max_completion_tokens(client, stream: bool) -> None:
    r = chat(client, stream, max_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.finish == {0: "length"}
    r = chat(client, stream, max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.finish == {0: "length"}
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4


@pytest.mark.integration
@both
def test_sampling_parameters_are_accepted_and_validated(client, stream: bool) -> None:
    r = chat(client, stream, max_tokens=4, temperature=0.7, top_p=0.9, extra_body={"top_k": 20})
    assert r.usage.completion_tokens == 4
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"extra_body": {"top_k": -2}}):
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, stream, max_tokens=4, **bad)
        assert err.value.body["param"] == next(iter(bad.get("extra_body", bad)))


@pytest.mark.integration
@both
def test_seed_reproduces_and_changes_the_output(client, stream: bool) -> None:
    a = chat(client, stream, max_tokens=12, temperature=1.0, seed=7)
    b = chat(client, stream, max_tokens=12, temperature=1.0, seed=7)
    c = chat(client, stream, max_tokens=12, temperature=1.0, seed=8)
    assert a.texts == b.texts and a.texts != c.texts


@pytest.mark.integration
@both
def test_n_choices(client, stream: bool) -> None:
    r = chat(client, stream, max_tokens=5, n=3, extra_body={"ignore_eos": True})
    assert (
        set(r.texts) == {0, 1, 2}
        and all(r.texts.values())
        and r.finish == {0: "length", 1: "length", 2: "length"}
    )
    assert r.usage.completion_tokens == 15
    c = complete(client, stream, prompt=["a", "b"], max_tokens=2, n=2)
    assert set(c.texts) == {0, 1, 2, 3}  # prompt-major: choices 0-1 for "a", 2-3 for "b"


@pytest.mark.integration
@both
def test_stop_strings(client, stream: bool) -> None:
    full = chat(client, False, max_tokens=24, extra_body={"ignore_eos": True}).texts[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = chat(client, stream, max_tokens=24, stop=stop, extra_body={"ignore_eos": True})
    assert r.texts[0] == cut and r.finish[0] == "stop"
    r = chat(client, stream, max_tokens=24, stop=["\x00never", stop], extra_body={"ignore_eos": True})
    assert r.texts[0] == cut and r.finish[0] == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, stream, max_tokens=4, stop=["a", "b", "c", "d", "e"])
    assert err.value.body["param"] == "stop" and "4" in err.value.body["message"]


@pytest.mark.integration
@both
def test_penalties_other_than_zero_are_refused(client, stream: bool) -> None:
    assert (
        chat(client, stream, max_tokens=2, presence_penalty=0, frequency_penalty=0).usage.completion_tokens
        == 2
    )
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, stream, max_tokens=2, **{name: 0.5})
        assert err.value.body["param"] == name


@pytest.mark.integration
@both
def test_chat_logprobs_and_top_logprobs(client, stream: bool) -> None:
    r = chat(client, stream, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    tokens = r.logprobs[0]
    assert len(tokens) == 6 and "".join(t.token for t in tokens) == r.texts[0]
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
    assert not chat(client, stream, max_tokens=3).logprobs.get(0)  # not asked for: none


@pytest.mark.integration
@both
def test_completion_logprobs_and_echo(client, stream: bool) -> None:
    r = complete(
        client, stream, prompt="Echo me", max_tokens=4, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    text = r.texts[0]
    assert text.startswith("Echo me") and len(text) > len("Echo me")
    parts = r.logprobs[0] if stream else [r.logprobs[0]]
    tokens = [t for p in parts for t in p.tokens]
    top = [t for p in parts for t in p.top_logprobs]
    assert "Echo me" + "".join(tokens) == text  # logprobs cover the generated tokens (no prompt logprobs)
    assert len(top) == 4 and all(len(d) == 2 and max(d.values()) <= 0 for d in top)
    plain = complete(client, stream, prompt="Echo me", max_tokens=4, extra_body={"ignore_eos": True})
    assert plain.texts[0] == text[len("Echo me") :]


@pytest.mark.integration
@both
def test_user_is_accepted(client, stream: bool) -> None:
    assert chat(client, stream, max_tokens=3, user="user-1234").usage.completion_tokens == 3


@pytest.mark.integration
@both
def test_cached_tokens_from_the_prefix_cache(client, stream: bool) -> None:
    long = [{"role": "user", "content": f"cache test {stream}: " + "word " * 200}]
    first = chat(client, stream, messages=long, max_tokens=2)
    second = chat(client, stream, messages=long, max_tokens=2)
    before = first.usage.prompt_tokens_details.cached_tokens  # at most the shared system-prompt block
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert before <= 16 and cached >= 192 and cached <= second.usage.prompt_tokens and cached % 16 == 0


# -- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory, default_model_dir):
    stack = Stack(tmp_path_factory.mktemp("params_real"), "--both", "1", engine="hf", timeout=300)
    yield openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    stack.stop()


@pytest.mark.e2e
@pytest.mark.slow
@both
def test_real_greedy_is_deterministic_and_seeded_sampling_reproduces(real, stream: bool) -> None:
    greedy = [chat(real, stream, max_tokens=12, temperature=0).texts[0] for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]
    kw = {"max_tokens": 12, "temperature": 1.3, "top_p": 0.95, "extra_body": {"top_k": 50}}
    a, b = chat(real, stream, seed=1, **kw), chat(real, stream, seed=1, **kw)
    assert a.texts == b.texts
    others = {chat(real, stream, seed=s, **kw).texts[0] for s in (2, 3, 4)}
    assert len(others | {a.texts[0]}) > 1  # seeds change the sample


@pytest.mark.e2e
@pytest.mark.slow
def test_real_top_k_1_is_greedy_and_logprobs_are_probabilities(real) -> None:
    greedy = chat(real, False, max_tokens=10, temperature=0).texts[0]
    assert (
        chat(real, False, max_tokens=10, temperature=1.5, seed=5, extra_body={"top_k": 1}).texts[0] == greedy
    )
    r = chat(real, True, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4)
    for t in r.logprobs[0]:
        probs = [2.718281828**x.logprob for x in t.top_logprobs]
        assert t.top_logprobs[0].token == t.token and 0 < sum(probs) <= 1.0001

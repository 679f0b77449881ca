"""API keys (HTTP and gRPC), --max-in-flight (429 / RESOURCE_EXHAUSTED), gRPC deadlines and
cancellation (the worker's blocks freed), and gRPC parity with HTTP, against real processes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from pdrouter_proto import inference_pb2 as ipb
from pdrouter_proto import inference_pb2_grpc as ipb_grpc
from router.auth import ApiKeys
from router.errors import ApiError
from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import Proc, Stack, free_port, pdrouter
from tests.test_worker_http import Worker

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
AUTH = (("authorization", "Bearer k1"),)
MAX_IN_FLIGHT = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    """Two keys on the command line, a limit of 2 requests at once and no queue, 50 ms per token."""
    s = Stack(
        tmp_path_factory.mktemp("auth"), "--both", "1", "--api-key", "k1", "--api-key", "k2",
        f"--router-arg=--max-in-flight={MAX_IN_FLIGHT}", "--router-arg=--max-queued=0",
        "--worker-arg=--mock-token-delay-ms=50",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(stack: Stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:
        yield ch


def _request(
    url: str, body: dict | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw, status, head = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, head = e.read(), e.code, e.headers
    return status, {k.lower(): v for k, v in head.items()}, json.loads(raw) if raw.startswith(b"{") else {}


def _chat_body(max_tokens: int = 4) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens}


def _client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def _grpc_chat(max_tokens: int, **fields) -> ipb.GenerateRequest:
    chat = ipb.ChatInput(messages=[ipb.ChatMessage(role="user", content=CHAT[0]["content"])])
    return ipb.GenerateRequest(model=MODEL, chat=chat, max_tokens=max_tokens, **fields)


def _grpc_run(channel, request: ipb.GenerateRequest) -> tuple[dict[int, str], dict[int, ipb.Complete], list]:
    texts: dict[int, str] = {}
    completes: dict[int, ipb.Complete] = {}
    chunks = []
    for resp in ipb_grpc.InferenceStub(channel).Generate(request, timeout=60, metadata=AUTH):
        if resp.WhichOneof("kind") == "chunk":
            chunks.append(resp.chunk)
            texts[resp.chunk.index] = texts.get(resp.chunk.index, "") + resp.chunk.text
        else:
            completes[resp.complete.index] = resp.complete
    return texts, completes, chunks


# -- API keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": "k1"}])
def test_http_without_the_key_is_401_in_openai_shape(stack, headers) -> None:
    paths = (("/v1/chat/completions", _chat_body()), ("/v1/models", None), ("/debug/requests", None))
    for path, body in paths:  # NOTE: /debug shows prompts' routing: keyed like the API
        status, head, reply = _request(stack.base_url + path, body, headers)
        assert status == 401, reply
        assert set(reply) == {"error"}
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
        assert "nope" not in error["message"] and head["www-authenticate"] == "Bearer"


def test_http_with_a_key(stack) -> None:
    for key in ("k1", "k2"):
        status, _, reply = _request(stack.base_url + "/v1/chat/completions", _chat_body(),
                                    {"authorization": f"bearer {key}"})  # fmt: skip
        assert status == 200 and reply["usage"]["completion_tokens"] == 4
    r = _client(stack, "k1").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert [m.id for m in _client(stack, "k2").models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as err:
        _client(stack, "wrong").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert err.value.code == "invalid_api_key"


def test_health_endpoints_stay_open(stack) -> None:
    for path in ("/health", "/ready", "/metrics"):
        with urllib.request.urlopen(stack.base_url + path, timeout=10) as r:
            assert r.status == 200


def test_grpc_without_the_key_is_unauthenticated(stack, channel) -> None:
    stub = ipb_grpc.InferenceStub(channel)
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_grpc_chat(2), timeout=10, metadata=metadata))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(ipb.ListModelsRequest(), timeout=10, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [m.id for m in stub.ListModels(ipb.ListModelsRequest(), timeout=10, metadata=AUTH).models] == [
        MODEL
    ]
    texts, completes, _ = _grpc_run(channel, _grpc_chat(3))
    assert texts[0] and completes[0].usage.completion_tokens == 3


def test_keys_from_env_and_file(tmp_path: Path, default_model_dir: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nf1\n  f2  \n")
    s = Stack(tmp_path, "--both", "1", "--api-key-file", str(key_file), env={"PDROUTER_API_KEY": "e1, e2"})
    try:
        for key in ("e1", "e2", "f1", "f2"):
            status, _, reply = _request(s.base_url + "/v1/models", None, {"authorization": f"Bearer {key}"})
            assert status == 200, (key, reply)
        assert _request(s.base_url + "/v1/models", None, {"authorization": "Bearer e1,e2"})[0] == 401
        assert "f1" not in " ".join(Path(f"/proc/{s.proc.pid}/cmdline").read_text().split("\0"))
    finally:
        s.stop()


def test_worker_http_api_takes_keys(tmp_path: Path, default_model_dir: Path) -> None:
    w = Worker(tmp_path, "--api-key", "w1")
    try:
        w.wait_ready()
        assert _request(w.url() + "/v1/models")[0] == 401
        assert _request(w.url() + "/v1/models", None, {"authorization": "Bearer w1"})[0] == 200
        assert _request(w.url() + "/health")[0] == 200
    finally:
        w.proc.stop()


def test_a_bad_key_file_stops_the_router_at_once(tmp_path: Path, default_model_dir: Path) -> None:
    router = Proc(
        pdrouter("router", "--port", str(free_port()), "--grpc-port", str(free_port()),
                 "--model", str(default_model_dir), "--worker", "127.0.0.1:1",
                 "--api-key-file", str(tmp_path / "missing")),
        tmp_path / "r.log",
    )  # fmt: skip
    try:
        assert router.proc.wait(timeout=60) != 0
        assert "--api-key-file" in router.log() and "missing" in router.log()
    finally:
        router.stop()


@pytest.mark.unit
def test_api_keys_compare_every_key_and_accept_bearer_in_any_case() -> None:
    keys = ApiKeys(["a", "bb", "a"])
    assert len(keys) == 2 and not ApiKeys().enabled
    ApiKeys().check(None)  # no keys: open
    for ok in ("Bearer a", "bearer bb", "BEARER  a "):
        keys.check(ok)
    for bad in (None, "", "a", "Bearer", "Bearer ab", "Basic a", "Bearer bbb"):
        with pytest.raises(ApiError) as err:
            keys.check(bad)
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
        assert err.value.envelope().error.type == "invalid_request_error"


# -- --max-in-flight ----------------------------------------------------------------------------------


def test_beyond_max_in_flight_is_429_then_admitted_again(stack, channel) -> None:
    client = _client(stack, "k1")
    held = []
    try:
        for _ in range(MAX_IN_FLIGHT):  # NOTE: 400 tokens at 50 ms: open until closed
            stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400, stream=True)
            next(iter(stream))
            held.append(stream)
        status, head, reply = _request(stack.base_url + "/v1/chat/completions", _chat_body(),
                                       {"authorization": "Bearer k1"})  # fmt: skip
        assert status == 429 and head["retry-after"] == "1"
        assert reply["error"]["type"] == "rate_limit_error" and "--max-in-flight" in reply["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        with pytest.raises(grpc.RpcError) as err:
            _grpc_run(channel, _grpc_chat(2))
        assert (
            err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "--max-in-flight" in err.value.details()
        )
        assert _request(stack.base_url + "/health")[0] == 200
    finally:
        for stream in held:
            stream.close()

    def admitted() -> bool:
        status, _, _ = _request(stack.base_url + "/v1/chat/completions", _chat_body(1),
                                {"authorization": "Bearer k1"})  # fmt: skip
        assert status in (200, 429)
        return status == 200

    wait_for(admitted, what="a request admitted once the held streams closed")


# -- gRPC deadlines and cancellation -----------------------------------------------------------------


def _started(channel, timeout: float | None = None):
    """A long gRPC generation, its first chunk read; (call, decode worker address)."""
    call = ipb_grpc.InferenceStub(channel).Generate(
        _grpc_chat(400, ignore_eos=True), timeout=timeout, metadata=AUTH
    )
    assert next(call).WhichOneof("kind") == "chunk"
    route = route_workers(dict(call.initial_metadata())["x-pdrouter-route"])
    address = route["decode"]
    assert worker_load(address).kv_blocks_used > 0
    return call, address


def test_grpc_deadline_ends_the_work_on_the_worker(stack, channel) -> None:
    call, address = _started(channel, timeout=1.5)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: worker_load(address).kv_blocks_used == 0, what="the worker's blocks freed")
    assert (
        _request(stack.base_url + "/v1/chat/completions", _chat_body(1), {"authorization": "Bearer k1"})[0]
        == 200
    )


def test_grpc_cancel_ends_the_work_on_the_worker(stack, channel) -> None:
    call, address = _started(channel)
    call.cancel()
    wait_for(lambda: worker_load(address).kv_blocks_used == 0, what="the worker's blocks freed")


# -- gRPC parity with HTTP ----------------------------------------------------------------------------


def test_grpc_n_and_seed_match_http(stack, channel) -> None:
    http = _client(stack, "k1").chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, n=2, seed=3, temperature=1.0
    )
    texts, completes, _ = _grpc_run(channel, _grpc_chat(5, n=2, seed=3, temperature=1.0))
    assert sorted(completes) == [0, 1]
    assert [texts[i] for i in (0, 1)] == [c.message.content for c in http.choices]
    assert all(c.usage.completion_tokens == 5 and c.finish_reason == "length" for c in completes.values())
    assert completes[0].usage.prompt_tokens == http.usage.prompt_tokens


def test_grpc_stop_matches_http(stack, channel) -> None:
    full, _, _ = _grpc_run(channel, _grpc_chat(12, temperature=0, seed=1))
    text = full[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    texts, completes, _ = _grpc_run(channel, _grpc_chat(12, temperature=0, seed=1, stop=[stop]))
    http = _client(stack, "k1").chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, seed=1, stop=[stop]
    )
    assert texts[0] == http.choices[0].message.content == text[: text.index(stop)]
    assert completes[0].finish_reason == http.choices[0].finish_reason == "stop"


def test_grpc_logprobs_echo_and_cached_tokens_match_http(stack, channel) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    http = _client(stack, "k1").completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    request = ipb.GenerateRequest(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    texts, completes, chunks = _grpc_run(channel, request)
    assert chunks[0].echo and chunks[0].text == prompt and not any(c.echo for c in chunks[1:])
    assert texts[0] == http.choices[0].text
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token for lp in lps] == http.choices[0].logprobs.tokens
    assert [lp.logprob for lp in lps] == pytest.approx(http.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert all(len(lp.top_tokens) == len(lp.top_token_ids) == 2 for lp in lps)
    usage = completes[0].usage
    assert usage.prompt_tokens == http.usage.prompt_tokens and usage.cached_tokens >= 16
    assert usage.total_tokens == usage.prompt_tokens + 4

    with pytest.raises(grpc.RpcError) as err:
        _grpc_run(channel, _grpc_chat(2, echo=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "echo" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _grpc_run(channel, _grpc_chat(2, logprobs=21))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details()

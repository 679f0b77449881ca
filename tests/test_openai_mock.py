"""The official openai client against `pdrouter serve --engine mock` (real processes)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from pdrouter_proto import inference_pb2 as ipb
from pdrouter_proto import inference_pb2_grpc as ipb_grpc

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(mock_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_models(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_non_streaming_usage(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.system_fingerprint


def test_chat_streaming_matches_non_streaming(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, seed=5)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_and_not(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 4
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_prefix_cache_reported_in_usage(client) -> None:
    long = [{"role": "user", "content": "Tell me about caching. " * 20}]
    client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    # NOTE: two workers round-robin; a third call lands where the first did
    third = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    cached = [
        again.usage.prompt_tokens_details.cached_tokens,
        third.usage.prompt_tokens_details.cached_tokens,
    ]
    assert max(cached) >= 16 * ((third.usage.prompt_tokens - 1) // 16)


def test_headers_request_id_and_route(mock_stack) -> None:
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 2}).encode()
    status, headers, _ = _post(mock_stack.base_url + "/v1/chat/completions", body, {"x-request-id": "abc123"})
    assert status == 200 and headers["x-request-id"] == "abc123"
    assert headers["x-pdrouter-route"].startswith("mode=aggregated;decode=127.0.0.1:")
    status, headers, _ = _post(mock_stack.base_url + "/v1/chat/completions", b"{")
    assert status == 400 and headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages", "empty_array"),
        (json.dumps({"model": "nope", "messages": CHAT}).encode(), 404, "model", "model_not_found"),
        (
            json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": -1}).encode(),
            400,
            "max_tokens",
            "invalid_value",
        ),
        (
            json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": "x"}).encode(),
            400,
            "max_tokens",
            "invalid_type",
        ),
        (
            json.dumps({"model": MODEL, "messages": CHAT, "temperature": 9}).encode(),
            400,
            "temperature",
            "invalid_value",
        ),
        (json.dumps({"model": MODEL}).encode(), 400, "messages", "invalid_type"),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}).encode(),
            400,
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_bad_input_gets_openai_error(mock_stack, body, status, param, code) -> None:
    got, _, payload = _post(mock_stack.base_url + "/v1/chat/completions", body)
    assert got == status
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param and payload["error"]["code"] == code
    assert payload["error"]["message"]


def test_context_error_names_the_numbers(mock_stack) -> None:
    body = json.dumps({"model": MODEL, "prompt": "hi " * 9000, "max_tokens": 10}).encode()
    status, _, payload = _post(mock_stack.base_url + "/v1/completions", body)
    assert status == 400 and "maximum context length is 8192 tokens" in payload["error"]["message"]


def test_unknown_route_and_method(mock_stack) -> None:
    status, _, payload = _post(mock_stack.base_url + "/v1/nothing", b"{}")
    assert status == 404 and payload["error"]["code"] == "unknown_route"
    status, _, payload = _post(mock_stack.base_url + "/v1/models", b"{}")
    assert status == 405


def test_openai_client_raises_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0)


def test_grpc_generate_equals_http(mock_stack, client) -> None:
    http = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, seed=9)
    with grpc.insecure_channel(f"127.0.0.1:{mock_stack.grpc_port}") as ch:
        stub = ipb_grpc.InferenceStub(ch)
        req = ipb.GenerateRequest(
            model=MODEL,
            chat=ipb.ChatInput(messages=[ipb.ChatMessage(role="user", content=CHAT[0]["content"])]),
            max_tokens=10,
            temperature=0,
            seed=9,
        )
        text, complete = "", None
        for resp in stub.Generate(req, timeout=30):
            if resp.WhichOneof("kind") == "chunk":
                text += resp.chunk.text
            else:
                complete = resp.complete
        assert text == http.choices[0].message.content
        assert complete.finish_reason == "length" and complete.usage.completion_tokens == 10
        assert [m.id for m in stub.ListModels(ipb.ListModelsRequest(), timeout=10).models] == [MODEL]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(ipb.GenerateRequest(model="nope", prompt="x"), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(ipb.GenerateRequest(model=MODEL, prompt="x", temperature=5), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()


def test_health_endpoints(mock_stack) -> None:
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(mock_stack.base_url + path, timeout=5) as r:
            assert r.status == 200

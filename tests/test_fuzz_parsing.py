"""Fuzzing the request parsing of the HTTP and gRPC front ends (hypothesis): whatever comes in,
the answer is a result or a 4xx / client-error status with a message, never a 5xx or a crash."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdrouter_proto import inference_pb2 as ipb
from pdrouter_proto import inference_pb2_grpc as ipb_grpc

pytestmark = pytest.mark.integration

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "bogus", ""]) | VALUES},
    optional={"content": st.text(max_size=40) | VALUES, "name": VALUES},
)
FIELDS = {
    "model": st.sampled_from(["default", "SmolLM2-135M-Instruct", "nope", ""]) | VALUES,
    "messages": st.lists(MESSAGE, max_size=3) | VALUES,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 60000), max_size=8) | VALUES,
    "max_tokens": st.integers(-5, 8) | VALUES,
    "max_completion_tokens": st.integers(-5, 8) | VALUES,
    "temperature": st.floats(-1, 3) | VALUES,
    "top_p": st.floats(-1, 2) | VALUES,
    "top_k": st.integers(-3, 100) | VALUES,
    "n": st.integers(-1, 5) | VALUES,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | VALUES,
    "seed": st.integers(-(2**70), 2**70) | VALUES,
    "logprobs": st.booleans() | st.integers(-1, 30) | VALUES,
    "top_logprobs": st.integers(-1, 30) | VALUES,
    "echo": st.booleans() | VALUES,
    "stream": st.booleans() | VALUES,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | VALUES,
    "presence_penalty": st.floats(-3, 3) | VALUES,
    "user": st.text(max_size=10) | VALUES,
    "ignore_eos": st.booleans() | VALUES,
}
BODIES = st.fixed_dictionaries({}, optional=FIELDS) | VALUES


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_http_bodies_never_5xx(mock_stack, body, path) -> None:
    status, raw = _post(mock_stack.base_url + path, json.dumps(body).encode())
    assert status < 500, (status, raw[:300])
    if status >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_http_raw_bytes_never_5xx(mock_stack, raw) -> None:
    status, _ = _post(mock_stack.base_url + "/v1/chat/completions", raw)
    assert status < 500


GRPC_OK = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
U32 = st.integers(0, 2**32 - 1)
ROLES = st.sampled_from(["user", "system", "assistant", "x", ""])
GRPC_FIELDS = {
    "max_tokens": st.integers(0, 40),
    "temperature": st.floats(-2, 4, width=32),
    "top_p": st.floats(-1, 2, width=32),
    "top_k": st.integers(-5, 50),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(max_size=4), max_size=6),
    "logprobs": st.integers(0, 40),
    "ignore_eos": st.booleans(),
    "n": st.integers(0, 20),
    "presence_penalty": st.floats(-3, 3, width=32),
}
REQUESTS = st.builds(
    lambda model, kind, text, ids, msgs, fields: _generate_request(model, kind, text, ids, msgs, fields),
    st.sampled_from(["default", "nope", ""]),
    st.sampled_from(["chat", "prompt", "tokens", "none"]),
    st.text(max_size=30),
    st.lists(U32, max_size=6),
    st.lists(st.tuples(ROLES, st.text(max_size=20)), max_size=3),
    st.fixed_dictionaries({}, optional=GRPC_FIELDS),
)


def _generate_request(model, kind, text, ids, msgs, fields) -> ipb.GenerateRequest:
    req = ipb.GenerateRequest(model=model, **fields)
    if kind == "chat":
        req.chat.CopyFrom(ipb.ChatInput(messages=[ipb.ChatMessage(role=r, content=c) for r, c in msgs]))
    elif kind == "prompt":
        req.prompt = text
    elif kind == "tokens":
        req.tokens.token_ids.extend(ids)
    return req


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_grpc_requests_never_internal(mock_stack, request) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mock_stack.grpc_port}") as ch:
        try:
            for _ in ipb_grpc.InferenceStub(ch).Generate(request, timeout=60):
                pass
        except grpc.RpcError as e:
            assert e.code() in GRPC_OK and e.details(), (e.code(), e.details())

# ruff: noqa: E501  (the table of cases reads best one case per line)
"""One case per client error: status, the exact OpenAI error shape, the field named, the limit given.

Cases that need their own stack are tested where that stack lives: 401 (missing or wrong API key)
in test_auth_and_limits.py, 429 (--max-in-flight, queue full or timed out) there and in
test_admission.py, 503 (draining) in test_drain.py, 503 (no healthy worker) in
test_router_workers_down.py; 400 for bodies fuzzed at random in test_fuzz_parsing.py.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _call(base: str, path: str, body: bytes | None, method: str = "POST", headers: dict | None = None):
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _chat(**kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2, **kw}).encode()


def _completion(**kw) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}).encode()


# (path, body, status, param, code, words the message must hold)
CASES = {
    "not json": (CHAT, b"{nope", 400, None, "invalid_json", ["not valid JSON"]),
    "wrong type": (CHAT, _chat(max_tokens="many"), 400, "max_tokens", "invalid_type", ["max_tokens"]),
    "messages missing": (CHAT, b'{"model": "default"}', 400, "messages", "invalid_type", ["messages"]),
    "messages empty": (CHAT, _chat(messages=[]), 400, "messages", "empty_array", ["at least one"]),
    "bad role": (CHAT, _chat(messages=[{"role": "wiz", "content": "x"}]), 400, "messages[0].role", None, ["wiz"]),
    "bad content part": (
        CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400, "messages[0].content[0].type", None, ["image_url", "text"],
    ),
    "max_tokens 0": (CHAT, _chat(max_tokens=0), 400, "max_tokens", None, ["at least 1", "0"]),
    "temperature": (CHAT, _chat(temperature=3), 400, "temperature", "invalid_value", ["temperature", "2"]),
    "top_p": (CHAT, _chat(top_p=0), 400, "top_p", None, ["top_p"]),
    "top_k": (CHAT, _chat(top_k=-5), 400, "top_k", None, ["top_k", "-5"]),
    "n": (CHAT, _chat(n=17), 400, "n", None, ["between 1 and 16", "17"]),
    "stop": (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None, ["at most 4", "5"]),
    "presence_penalty": (CHAT, _chat(presence_penalty=1), 400, "presence_penalty", None, ["not supported"]),
    "top_logprobs without logprobs": (CHAT, _chat(top_logprobs=2), 400, "top_logprobs", None, ["logprobs"]),
    "top_logprobs": (CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None, ["0 and 20"]),
    "logprobs": (COMPLETIONS, _completion(logprobs=21), 400, "logprobs", None, ["between 0 and 20", "21"]),
    "prompt empty": (COMPLETIONS, _completion(prompt=[]), 400, "prompt", "empty_array", ["prompt"]),
    "prompt wrong type": (COMPLETIONS, _completion(prompt=[1.5]), 400, "prompt[0]", None, ["prompt"]),
    "context length": (
        COMPLETIONS, _completion(prompt="hi " * 9000, max_tokens=10), 400, "prompt", "context_length_exceeded",
        ["maximum context length is 8192 tokens", "9011 tokens (9001 in the prompt, 10 in the completion)"],
    ),
    "max_tokens beyond context": (
        CHAT, _chat(max_tokens=9000), 400, "messages", "context_length_exceeded", ["8192", "9000 in the completion"],
    ),
    "unknown model": (CHAT, _chat(model="gpt-9"), 404, "model", "model_not_found", ["gpt-9"]),
    "unknown route": ("/v1/embeddings", _chat(), 404, None, "unknown_route", ["/v1/embeddings"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_error(mock_stack, case: str) -> None:
    path, body, status, param, code, words = CASES[case]
    got, headers, reply = _call(mock_stack.base_url, path, body)
    assert got == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    error = reply["error"]
    assert error["param"] == param and error["type"] == (
        "not_found_error" if status == 404 else "invalid_request_error"
    )
    if code is not None:
        assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]
    assert headers["x-request-id"]


def test_wrong_method_is_405(mock_stack) -> None:
    status, _, reply = _call(mock_stack.base_url, CHAT, None, method="GET")
    assert (
        status == 405
        and reply["error"]["type"] == "invalid_request_error"
        and "GET" in reply["error"]["message"]
    )


def test_body_too_large_is_413(mock_stack) -> None:
    """Refused on its Content-Length, before the body is read."""
    conn = http.client.HTTPConnection(mock_stack.base_url.removeprefix("http://"), timeout=30)
    try:
        conn.putrequest("POST", CHAT)
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(9 << 20))
        conn.endheaders(b'{"model": "')
        resp = conn.getresponse()
        status, reply = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 413 and reply["error"]["param"] is None and "bytes" in reply["error"]["message"]


def test_own_deadline_passed_is_504(mock_stack) -> None:
    body = _chat(max_tokens=500, ignore_eos=True)
    status, _, reply = _call(mock_stack.base_url, CHAT, body, headers={"x-request-timeout": "0.05"})
    assert status == 504 and reply["error"]["code"] == "deadline_exceeded"
    assert reply["error"]["param"] == "x-request-timeout" and "0.05 s" in reply["error"]["message"]


def test_unknown_fields_are_ignored(mock_stack) -> None:
    body = _chat(service_tier="auto", reasoning_effort="low", metadata={"a": "b"}, store=False)
    status, _, reply = _call(mock_stack.base_url, CHAT, body)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2

"""The OpenAPI 3.1 document of the router's HTTP API (`GET /openapi.json`), built once per process.

Every request and response schema is generated from the msgspec Structs the handlers decode and
encode (`router.openai_schema`, `router.errors`, `router.timeline`) by
`msgspec.json.schema_components`, so the document cannot drift from the code; the request
schemas then get the limits `router.requests` enforces (from its constants) and the served model
names. msgspec writes JSON Schema 2020-12 (`"type": "null"` in unions), the dialect of OpenAPI 3.1.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from router import openai_schema as oa
from router.errors import ErrorEnvelope
from router.requests import CHAT_ROLES, MAX_N, MAX_STOP, MAX_TOP_LOGPROBS
from router.timeline import TimelineView

_REF = "#/components/schemas/{name}"
_STRUCTS = (
    oa.ChatCompletionRequest,
    oa.CompletionRequest,
    oa.ChatCompletion,
    oa.ChatCompletionChunk,
    oa.Completion,
    oa.ModelList,
    ErrorEnvelope,
    TimelineView,
)
_ZERO = {"minimum": 0, "maximum": 0}
_COMMON_LIMITS = {
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "n": {"minimum": 1, "maximum": MAX_N},
    "max_tokens": {"minimum": 1},
    "stop": {"minLength": 1, "maxItems": MAX_STOP},
    "presence_penalty": _ZERO,  # NOTE: not supported: only 0 (or absent) is accepted
    "frequency_penalty": _ZERO,
}
_LIMITS = {  # what router.requests enforces beyond the types (the context length is checked there too)
    "ChatCompletionRequest": {
        **_COMMON_LIMITS,
        "messages": {"minItems": 1},
        "max_completion_tokens": {"minimum": 1},
        "top_logprobs": {"minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    },
    "CompletionRequest": {
        **_COMMON_LIMITS,
        "prompt": {"minLength": 1, "minItems": 1},
        "logprobs": {"minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    },
    "ChatMessage": {"role": {"enum": sorted(CHAT_ROLES)}},
}
_ERRORS = {
    "400": "Invalid input: the message names the field and the limit",
    "401": "Missing or wrong API key (when the server requires one)",
    "404": "Unknown model (or request id, for /debug)",
    "413": "Request body too large",
    "429": "A worker's admission queue is full; retry later (retry-after)",
    "502": "A worker failed the request",
    "503": "No healthy worker, or the server is draining (retry-after)",
    "504": "The x-request-timeout deadline passed",
}
_HEADERS = [
    ("x-request-id", {"type": "string"}, "echoed back; a new id when absent"),
    ("x-session-id", {"type": "string"}, "pins a conversation to one worker"),
    ("x-request-timeout", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 86400},
     "deadline for the whole request, seconds (504 when it passes)"),
]  # fmt: skip


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": _json(_ref("ErrorEnvelope"))} for c in codes}


def _status(value: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"status": {"const": value}}, "required": ["status"]}
    return {"200": {"description": value, "content": _json(schema)}}


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.2's reading of an event stream, as 3.1 tools take it)."""
    payload = {"anyOf": [_ref(chunk), _ref("ErrorEnvelope")]}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                            "contentSchema": payload}]}  # fmt: skip
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _generate(op_id: str, request: str, response: str, chunk: str, security: list) -> dict[str, Any]:
    sse = (f"`stream: true`: server-sent events, each `data:` a {chunk} (or an ErrorEnvelope if the "
           "request fails after the stream started), then `data: [DONE]`")  # fmt: skip
    return {
        "summary": f"OpenAI {op_id}",
        "operationId": op_id,
        "security": security,
        "parameters": [{"name": n, "in": "header", "schema": s, "description": d} for n, s, d in _HEADERS],
        "requestBody": {
            "required": True,
            "description": "Unknown fields are ignored (clients add new ones all the time).",
            "content": _json(_ref(request)),
        },
        "responses": {
            "200": {
                "description": "The completion (JSON), or a stream of chunks (SSE) when `stream` is true",
                "headers": {
                    "x-request-id": {"schema": {"type": "string"}},
                    "x-pdrouter-route": {"schema": {"type": "string"}, "description": "mode and workers"},
                },
                "content": {
                    **_json(_ref(response)),
                    "text/event-stream": {"schema": _event(chunk)},
                },
            },
            **_errors("400", "401", "404", "413", "429", "502", "503", "504"),
        },
        "description": sse,
    }


def _get(op_id: str, summary: str, security: list, responses: dict, params: list | None = None) -> dict:
    op = {"summary": summary, "operationId": op_id, "security": security, "responses": responses}
    return {"get": {**op, "parameters": params} if params else op}


def _paths(protected: list) -> dict[str, Any]:
    public: list = []
    timeline = _json(_ref("TimelineView"))
    timelines = _json({"type": "array", "items": _ref("TimelineView")})
    text = {"text/plain": {"schema": {"type": "string"}}}
    query = [
        {
            "name": "slowest",
            "in": "query",
            "schema": {"type": "integer"},
            "description": "how many (default 10), clamped to [1, the number kept]",
        },
        {"name": "by", "in": "query", "schema": {"enum": ["ttft", "e2e"]}},
    ]
    request_id = [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    chat = _generate(
        "createChatCompletion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", protected
    )
    completions = _generate("createCompletion", "CompletionRequest", "Completion", "Completion", protected)
    return {
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {"post": completions},
        "/v1/models": _get("listModels", "The served model", protected, {
            "200": {"description": "the model", "content": _json(_ref("ModelList"))}, **_errors("401")}),
        "/health": _get("health", "Liveness: the router process is up", public, _status("ok")),
        "/ready": _get("ready", "Readiness: a healthy worker, not draining", public,
                       {**_status("ready"), **_errors("503")}),
        "/metrics": _get("metrics", "Prometheus metrics", public,
                         {"200": {"description": "text exposition format", "content": text}}),
        "/openapi.json": _get("openapi", "This document", public,
                              {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}}),
        "/debug/requests": _get("slowestRequests", "The slowest recent requests", public,
                                {"200": {"description": "timelines", "content": timelines},
                                 **_errors("400")}, query),
        "/debug/requests/{request_id}": _get("requestTimeline", "One recent request's timeline", public,
                                             {"200": {"description": "its timeline", "content": timeline},
                                              **_errors("404")}, request_id),
    }  # fmt: skip


@functools.cache
def document(auth_required: bool = False, models: tuple[str, ...] = ()) -> bytes:
    """The document as JSON bytes. `auth_required`: /v1/* needs a bearer API key (`--api-key`);
    `models`: the names the server answers to (any other `model` gets a 404)."""
    _, schemas = msgspec.json.schema_components(_STRUCTS, ref_template=_REF)
    for struct, limits in _LIMITS.items():
        for field, keywords in limits.items():
            schemas[struct]["properties"][field].update(keywords)
    if models:
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            schemas[name]["properties"]["model"] = {"type": "string", "enum": list(models)}
    protected = [{"bearerAuth": []}] if auth_required else [{}, {"bearerAuth": []}]
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "pdrouter",
            "version": "0.1.0",
            "description": "OpenAI-compatible router in front of prefill/decode workers. Errors are "
            '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "paths": _paths(protected),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the API key"}
            },
        },
    }
    return msgspec.json.encode(doc)

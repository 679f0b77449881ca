"""The OpenAI-compatible HTTP API as a plain ASGI app (served by uvicorn + httptools + uvloop).

Per request: read the body (size-capped) -> decode with msgspec (unknown fields ignored) ->
tokenize -> validate -> route -> stream deltas as SSE, or collect them into one JSON body.
A client that disconnects cancels the handler, which cancels the worker calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from router import openai_schema as oa
from router import openapi, timeline
from router.admission import DRAINING_MESSAGE, Admission
from router.auth import ApiKeys
from router.errors import ApiError, invalid
from router.orchestrator import ChoiceDelta, Orchestrator
from router.requests import (
    GenerationRequest,
    Limits,
    chat_messages,
    chat_request,
    completion_prompts,
    completion_request,
)
from router.route_planner import Route
from router.timeline import TimelineRing
from router.tokenizer import ChatTemplateError, Tokenizer

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

log = logging.getLogger("pdrouter.router.http")
SYSTEM_FINGERPRINT = "pdrouter-0.1.0"
_json = msgspec.json.Encoder()
_chat_decoder = msgspec.json.Decoder(oa.ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(oa.CompletionRequest)
_LONG_PROMPT_CHARS = 16_384  # tokenize longer prompts off the event loop


def _error_from_msgspec(exc: msgspec.DecodeError) -> ApiError:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        param = None
        if " - at `$." in text:
            param = text.rsplit(" - at `$.", 1)[1].rstrip("`")
        elif "Object missing required field `" in text:
            param = text.split("`")[1]
        return invalid(f"Invalid request: {text}", param, "invalid_type" if param else "invalid_value")
    return invalid(f"Request body is not valid JSON: {text}", None, "invalid_json")


class RouterState:
    """What the HTTP and gRPC front ends share."""

    def __init__(
        self, orchestrator: Orchestrator, tokenizer: Tokenizer, limits: Limits, max_body_bytes: int
    ) -> None:
        self.orchestrator = orchestrator
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())
        self.timelines = TimelineRing()
        self.trace_every_nth_token = 1  # token events on the request span: every Nth token
        self.admission = Admission()
        self.api_keys = ApiKeys()  # none: the API is open
        self.ready_min_workers = 1  # NOTE: `serve` asks for every worker it starts
        self._started = False  # ready_min_workers were healthy once

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def num_active(self) -> int:
        return self.admission.num_active

    @property
    def ready(self) -> bool:
        """A healthy decode worker, and at start-up `ready_min_workers` healthy workers: once that
        many were up, one lost worker must not take the router out of its load balancer."""
        pool = self.orchestrator.pool
        if self.draining or not pool.healthy("decode"):
            return False
        if not self._started:
            self._started = len(pool.healthy()) >= self.ready_min_workers
        return self._started

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            if sum(len(m["content"]) for m in messages) > _LONG_PROMPT_CHARS:
                return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages)
            return self.tokenizer.apply_chat_template(messages)
        except ChatTemplateError as e:
            raise invalid(str(e), "messages") from None

    async def encode_text(self, text: str) -> list[int]:
        if len(text) > _LONG_PROMPT_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


_GENERATE_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))


def _trace_headers(scope: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in scope["headers"] if k in (b"traceparent", b"tracestate")}


def _deadline_s(scope: dict) -> float | None:
    """The client's deadline for the whole request, in seconds (`x-request-timeout` header)."""
    raw = _header(scope, b"x-request-timeout")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:
        raise invalid("'x-request-timeout' must be a number of seconds in (0, 86400)", "x-request-timeout")
    return value


def _mark(name: str) -> None:
    tl = timeline.current()
    if tl is not None:
        tl.mark(name)


def _gen_attributes(gen: GenerationRequest) -> dict[str, object]:
    """OpenTelemetry GenAI semantic-convention attributes of a request."""
    return {
        "gen_ai.operation.name": "chat" if gen.chat else "text_completion",
        "gen_ai.request.model": gen.model,
        "gen_ai.request.max_tokens": gen.max_tokens,
        "gen_ai.usage.input_tokens": sum(len(p) for p in gen.prompts),
        "gen_ai.response.id": gen.request_id,
    }


class _Response:
    """Tracks whether headers went out, so an error after that becomes an SSE error event."""

    __slots__ = ("mode", "request_id", "send", "started")

    def __init__(self, send: Send, request_id: str) -> None:
        self.send = send
        self.request_id = request_id
        self.started = False
        self.mode = "none"  # the route mode, for the requests counter

    def _headers(self, content_type: bytes, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", content_type), (b"x-request-id", self.request_id.encode()), *extra]

    async def json(self, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        headers = self._headers(b"application/json", list(extra))
        headers.append((b"content-length", str(len(body)).encode()))
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def error(self, exc: ApiError) -> None:
        extra = [(b"retry-after", b"1")] if exc.status in (429, 503) else []
        if exc.status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        await self.json(exc.status, _json.encode(exc.envelope()), extra)

    async def start_sse(self, extra: list[tuple[bytes, bytes]]) -> None:
        headers = self._headers(b"text/event-stream", extra)
        headers.append((b"cache-control", b"no-cache"))
        self.started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def event(self, payload: bytes) -> None:
        await self.send(
            {"type": "http.response.body", "body": b"data: " + payload + b"\n\n", "more_body": True}
        )

    async def end_sse(self) -> None:
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


class HttpApp:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.routes: dict[tuple[str, str], Callable[[dict, Receive, _Response], Awaitable[None]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/openapi.json"): self.openapi_document,
            ("POST", "/v1/chat/completions"): self._counted(self.chat),
            ("POST", "/v1/completions"): self._counted(self.completions),
        }
        self.paths = {path for _, path in self.routes}

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        resp = _Response(send, request_id)
        path = scope["path"].rstrip("/") or "/"
        handler = self.routes.get((scope["method"], path))
        if handler is None and scope["method"] == "GET" and path.startswith("/debug/requests"):
            handler = self.debug_requests
        status = 200
        tl = timeline.start(request_id, _trace_headers(scope)) if path in _GENERATE_PATHS else None
        try:
            if path.startswith(("/v1/", "/debug/")):  # NOTE: timelines show prompts' routing: keyed too
                self.state.api_keys.check(_header(scope, b"authorization"))
            if handler is None:
                if path in self.paths:
                    raise ApiError(
                        405, f"Method {scope['method']} is not allowed on {path}", None, "method_not_allowed"
                    )
                raise ApiError(404, f"Unknown route {scope['method']} {path}", None, "unknown_route")
            await handler(scope, receive, resp)
        except ApiError as exc:
            status = exc.status
            await self._fail(resp, exc)
        except asyncio.CancelledError:
            status = 499  # client went away; the worker calls were cancelled with us
        except Exception as exc:  # NOTE: never a traceback to the client, never a dead router
            log.exception("unhandled error")
            status = 500
            await self._fail(
                resp, ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", None, "internal_error")
            )
        finally:
            if path.startswith("/v1/"):
                self.state.orchestrator.metrics.requests.labels(path, str(status), resp.mode).inc()
            if tl is not None:
                tl.finish(status, self.state.trace_every_nth_token)
                self.state.timelines.add(tl)

    async def _fail(self, resp: _Response, exc: ApiError) -> None:
        if not resp.started:
            await resp.error(exc)
            return
        with contextlib.suppress(Exception):
            await resp.event(_json.encode(exc.envelope()))
            await resp.end_sse()

    def _counted(self, handler: Callable[[dict, Receive, _Response], Awaitable[None]]):
        """A generation handler, admitted (router/admission.py) and counted until it ends."""

        async def run(scope: dict, receive: Receive, resp: _Response) -> None:
            await self.state.admission.acquire()
            try:
                await handler(scope, receive, resp)
            finally:
                self.state.admission.release()

        return run

    # -- small endpoints --------------------------------------------------------------------

    async def debug_requests(self, scope: dict, receive: Receive, resp: _Response) -> None:
        """GET /debug/requests/{id}: one recent request's timeline; /debug/requests?slowest=N&by=ttft|e2e."""
        ring = self.state.timelines
        rest = scope["path"].rstrip("/")[len("/debug/requests") :].lstrip("/")
        if rest:
            tl = ring.get(rest)
            if tl is None:
                raise ApiError(404, f"No recent request {rest!r} (the router keeps the last {ring.capacity})",
                               None, "unknown_request")  # fmt: skip
            await resp.json(200, _json.encode(tl.view()))
            return
        query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
        try:
            n = max(1, min(int(query.get("slowest", "10")), ring.capacity))
        except ValueError:
            raise invalid("'slowest' must be an integer", "slowest") from None
        by = query.get("by", "ttft")
        if by not in ("ttft", "e2e"):
            raise invalid("'by' must be 'ttft' or 'e2e'", "by")
        await resp.json(200, _json.encode([tl.view() for tl in ring.slowest(n, by)]))

    async def health(self, scope: dict, receive: Receive, resp: _Response) -> None:
        await resp.json(200, b'{"status":"ok"}')

    async def ready(self, scope: dict, receive: Receive, resp: _Response) -> None:
        if self.state.draining:
            raise ApiError(503, DRAINING_MESSAGE, None, "draining")
        if self.state.ready:
            await resp.json(200, b'{"status":"ready"}')
        else:
            raise ApiError(503, "No healthy worker yet", None, "not_ready")

    async def metrics(self, scope: dict, receive: Receive, resp: _Response) -> None:
        m = self.state.orchestrator.metrics
        m.observe_workers(self.state.orchestrator.pool.workers)
        m.queued.set(self.state.admission.num_queued)
        body, content_type = m.render()
        resp.started = True
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await resp.send({"type": "http.response.start", "status": 200, "headers": headers})
        await resp.send({"type": "http.response.body", "body": body})

    async def openapi_document(self, scope: dict, receive: Receive, resp: _Response) -> None:
        models = tuple(sorted(self.state.limits.aliases))
        await resp.json(200, openapi.document(self.state.api_keys.enabled, models))

    async def models(self, scope: dict, receive: Receive, resp: _Response) -> None:
        lim = self.state.limits
        card = oa.ModelCard(lim.model_name, self.state.started, "pdrouter", lim.max_model_len)
        await resp.json(200, _json.encode(oa.ModelList([card])))

    # -- generation -------------------------------------------------------------------------

    async def chat(self, scope: dict, receive: Receive, resp: _Response) -> None:
        body = await self._body(scope, receive)
        try:
            req = _chat_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _error_from_msgspec(exc) from None
        _mark("parsed")
        self.state.limits.check_model(req.model)
        messages = chat_messages(req)
        prompt = await self.state.encode_chat(messages)
        _mark("tokenized")
        gen = chat_request(req, prompt, self.state.limits)
        await self._generate(gen, scope, receive, resp)

    async def completions(self, scope: dict, receive: Receive, resp: _Response) -> None:
        body = await self._body(scope, receive)
        try:
            req = _completion_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise _error_from_msgspec(exc) from None
        _mark("parsed")
        self.state.limits.check_model(req.model)
        prompts = [
            p if isinstance(p, list) else await self.state.encode_text(p) for p in completion_prompts(req)
        ]
        _mark("tokenized")
        gen = completion_request(req, prompts, self.state.limits)
        await self._generate(gen, scope, receive, resp)

    async def _body(self, scope: dict, receive: Receive) -> bytes:
        limit = self.state.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"Request body is {declared} bytes; the limit is {limit} bytes", None, "body_too_large"
            )
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise asyncio.CancelledError
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"Request body exceeds the limit of {limit} bytes", None, "body_too_large"
                )
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    async def _generate(self, gen: GenerationRequest, scope: dict, receive: Receive, resp: _Response) -> None:
        orch = self.state.orchestrator
        route = orch.route(gen, _header(scope, b"x-session-id") or gen.session_id)
        header = orch.route_header(route)
        extra = [(b"x-pdrouter-route", header.encode())]
        resp.mode = route[0].mode
        tl = timeline.current()
        if tl is not None:
            tl.mark("routed")
            tl.mode, tl.route = resp.mode, header
            tl.aliases.append(gen.request_id)
            tl.attrs.update(_gen_attributes(gen))
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
        deadline = _deadline_s(scope)
        try:
            async with asyncio.timeout(deadline):
                if gen.stream:
                    await self._stream(gen, route, resp, extra)
                else:
                    await self._collect(gen, route, resp)
        except TimeoutError:
            raise ApiError(
                504, f"The request's deadline of {deadline:g} s (x-request-timeout) passed",
                "x-request-timeout", "deadline_exceeded",
            ) from None  # fmt: skip
        finally:
            watcher.cancel()

    async def _collect(self, gen: GenerationRequest, route: list[Route], resp: _Response) -> None:
        n = gen.num_choices
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        usage = _UsageSum(gen)
        async for d in self.state.orchestrator.run(gen, route):
            if d.text:
                texts[d.index].append(d.text)
            if d.logprobs:
                lps[d.index].extend(d.logprobs)
            if d.finish_reason is not None:
                finish[d.index] = d.finish_reason
                usage.add(d)
        created = int(time.time())
        if gen.chat:
            choices = [
                oa.ChatChoice(
                    i,
                    oa.ResponseMessage(content="".join(texts[i])),
                    self._chat_logprobs(lps[i]) if gen.logprobs is not None else None,
                    finish[i],
                )
                for i in range(n)
            ]
            body = oa.ChatCompletion(
                gen.request_id, created, gen.model, SYSTEM_FINGERPRINT, choices, usage.result()
            )
        else:
            choices = []
            for i in range(n):
                prefix = self._echo_text(gen, i)
                text = prefix + "".join(texts[i])
                logprobs = (
                    self._completion_logprobs(lps[i], len(prefix)) if gen.logprobs is not None else None
                )
                choices.append(oa.CompletionChoice(i, text, logprobs, finish[i]))
            body = oa.Completion(
                gen.request_id, created, gen.model, SYSTEM_FINGERPRINT, choices, usage.result()
            )
        # NOTE: sent after the answer, so it names the workers that served it (after a failover)
        header = self._served(route, resp)
        await resp.json(200, _json.encode(body), [(b"x-pdrouter-route", header.encode())])
        _mark("first_sent")  # NOTE: not streaming: the first token reaches the client with the last

    async def _stream(self, gen: GenerationRequest, route: list[Route], resp: _Response, extra) -> None:
        created = int(time.time())
        usage = _UsageSum(gen)
        rid, model = gen.request_id, gen.model
        await resp.start_sse(extra)
        if gen.chat:
            first = [
                oa.ChatChunkChoice(i, oa.Delta(role="assistant", content=""), None, None)
                for i in range(gen.num_choices)
            ]
            await resp.event(
                _json.encode(oa.ChatCompletionChunk(rid, created, model, SYSTEM_FINGERPRINT, first))
            )
        elif gen.echo:
            for i in range(gen.num_choices):
                choice = oa.CompletionChoice(i, self._echo_text(gen, i), None, None)
                await resp.event(
                    _json.encode(oa.Completion(rid, created, model, SYSTEM_FINGERPRINT, [choice], None))
                )
        async for d in self.state.orchestrator.run(gen, route):
            if d.finish_reason is not None:
                usage.add(d)
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            if gen.chat:
                lp = self._chat_logprobs(d.logprobs) if d.logprobs else None
                choice = oa.ChatChunkChoice(d.index, oa.Delta(content=d.text), lp, d.finish_reason)
                payload = oa.ChatCompletionChunk(rid, created, model, SYSTEM_FINGERPRINT, [choice])
            else:
                lp = self._completion_logprobs(d.logprobs, 0) if d.logprobs else None
                payload = oa.Completion(
                    rid,
                    created,
                    model,
                    SYSTEM_FINGERPRINT,
                    [oa.CompletionChoice(d.index, d.text, lp, d.finish_reason)],
                    None,
                )
            await resp.event(_json.encode(payload))
            if d.text:
                _mark("first_sent")
        if gen.include_usage:
            if gen.chat:
                payload = oa.ChatCompletionChunk(rid, created, model, SYSTEM_FINGERPRINT, [], usage.result())
            else:
                payload = oa.Completion(rid, created, model, SYSTEM_FINGERPRINT, [], usage.result())
            await resp.event(_json.encode(payload))
        self._served(route, resp)  # NOTE: the header went out with the plan; the timeline gets the truth
        await resp.end_sse()

    def _served(self, route: list[Route], resp: _Response) -> str:
        """The route as it was served (failovers update it): for the timeline, metrics, header."""
        header = self.state.orchestrator.route_header(route)
        resp.mode = route[0].mode
        tl = timeline.current()
        if tl is not None:
            tl.mode, tl.route = resp.mode, header
        return header

    # -- shaping helpers ----------------------------------------------------------------------

    def _echo_text(self, gen: GenerationRequest, index: int) -> str:
        if not gen.echo:
            return ""
        return self.state.tokenizer.decode(gen.prompts[index // gen.n], skip_special_tokens=False)

    def _chat_logprobs(self, items) -> oa.ChatLogprobs:
        tt = self.state.token_text
        content = []
        for it in items:
            tok = tt(it.token_id)
            top = [oa.TopLogprob(tt(t), lp, list(tt(t).encode())) for t, lp in it.top]
            content.append(oa.ChatTokenLogprob(tok, it.logprob, list(tok.encode()), top))
        return oa.ChatLogprobs(content)

    def _completion_logprobs(self, items, offset: int) -> oa.CompletionLogprobs:
        tt = self.state.token_text
        tokens, lps, tops, offsets = [], [], [], []
        for it in items:
            tok = tt(it.token_id)
            tokens.append(tok)
            lps.append(it.logprob)
            tops.append({tt(t): lp for t, lp in it.top} if it.top else None)
            offsets.append(offset)
            offset += len(tok)
        return oa.CompletionLogprobs(tokens, lps, tops, offsets)


class _UsageSum:
    def __init__(self, gen: GenerationRequest) -> None:
        self.prompt = sum(len(p) for p in gen.prompts)
        self.completion = 0
        self.cached_by_prompt: dict[int, int] = {}
        self.n = gen.n

    def add(self, d: ChoiceDelta) -> None:
        self.completion += d.completion_tokens
        key = d.index // self.n
        self.cached_by_prompt[key] = max(self.cached_by_prompt.get(key, 0), d.cached_tokens)

    def result(self) -> oa.Usage:
        cached = sum(self.cached_by_prompt.values())
        return oa.Usage(
            self.prompt, self.completion, self.prompt + self.completion, oa.PromptTokensDetails(cached)
        )


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            task.cancel()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None

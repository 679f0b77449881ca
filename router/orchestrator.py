"""Runs one GenerationRequest against the workers and yields text deltas per choice.

Per choice: plan a route -> aggregated: Decode on one worker, which prefills locally;
disaggregated: Prefill on the prefill worker (first token streamed at once: TTFT) then
Decode on the decode worker with the KV handle (it pulls only the blocks it lacks) ->
incremental detokenization -> stop strings -> deltas. A worker unreachable before its first
token is marked unhealthy and the leg goes elsewhere; if the decode leg fails or the client
goes away, the handle is released on the prefill worker. Cancelling the consumer cancels the
gRPC calls, which abort the work and free the blocks on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdrouter_proto import worker_pb2 as pb
from router import timeline
from router.detokenizer import IncrementalDetokenizer
from router.errors import ApiError
from router.metrics import RouterMetrics
from router.requests import GenerationRequest
from router.route_planner import Route, RoutePlanner
from router.stop_strings import StopStringMatcher
from router.tokenizer import Tokenizer
from router.worker_pool import WorkerClient

log = logging.getLogger("pdrouter.router.orchestrator")

FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
# Worker error code (grpc.StatusCode value) -> HTTP status.
_HTTP_FROM_GRPC = {3: 400, 5: 404, 6: 409, 8: 429, 9: 400, 11: 400, 14: 503, 4: 504}
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
# NOTE: what counts against a worker's circuit breaker: its own faults, not the client's or load
_WORKER_FAULTS = frozenset((*_RETRYABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS))


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


def _why(exc: BaseException) -> str:
    return f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)


class _StreamBroke(Exception):
    """A decode stream that ended without its Complete: the worker went away mid-generation."""


def _client_span(name: str, worker: WorkerClient):
    """A span for this call (when the request has a timeline) and the metadata carrying it."""
    tl = timeline.current()
    if tl is None:
        return None, ()
    return tl.client_span(name, {"pdrouter.worker": worker.worker_id})


def _end(span) -> None:
    if span is not None:
        span.end()


def _worker_timing(**values: float) -> None:
    tl = timeline.current()
    if tl is not None:
        tl.worker.update(values)


def _worker_error(err: pb.Error) -> ApiError:
    return ApiError(_HTTP_FROM_GRPC.get(err.code, 500), err.message, None, "worker_error")


class _Choice:
    """Detokenizer + stop strings of one choice: turns token chunks into deltas."""

    def __init__(self, orch: Orchestrator, gen: GenerationRequest, index: int) -> None:
        self.index = index
        self.detok = IncrementalDetokenizer(orch.tokenizer)
        self.stops = StopStringMatcher(gen.stop) if gen.stop else None
        self.want_logprobs = gen.logprobs is not None
        self.num_tokens = 0
        self.token_ids: list[int] = []  # everything generated so far: what a migration resumes from

    def chunk(self, chunk: pb.TokenChunk) -> ChoiceDelta:
        self.num_tokens += len(chunk.token_ids)
        self.token_ids.extend(chunk.token_ids)
        delta = ChoiceDelta(self.index, token_ids=list(chunk.token_ids))
        text = self.detok.add(chunk.token_ids)
        if self.want_logprobs:
            delta.logprobs = _logprobs(chunk)
        if self.stops is not None:
            text, hit = self.stops.feed(text)
            if hit:
                delta.finish_reason = "stop"
        delta.text = text
        return delta

    def finish(self, reason: str, prompt_tokens: int, cached_tokens: int) -> ChoiceDelta:
        tail = self.detok.flush()
        if self.stops is not None:
            text, hit = self.stops.feed(tail)
            tail = text if hit else text + self.stops.flush()
        return ChoiceDelta(
            self.index, text=tail, finish_reason=reason, prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens, completion_tokens=self.num_tokens,
        )  # fmt: skip


class Orchestrator:
    def __init__(
        self,
        planner: RoutePlanner,
        tokenizer: Tokenizer,
        metrics: RouterMetrics | None = None,
        migration_limit: int = 3,
    ) -> None:
        self.planner = planner
        self.pool = planner.pool
        self.tokenizer = tokenizer
        self.metrics = metrics or RouterMetrics()
        self.migration_limit = migration_limit  # decode streams resumed elsewhere, per choice
        self.idle_timeout_s = 60.0  # a decode stream silent this long is broken (stalled worker)

    def route(self, gen: GenerationRequest, session_id: str = "") -> list[Route]:
        """Plan every choice before any byte is sent, so routing errors are still clean 5xx."""
        routes = []
        for i in range(gen.num_choices):
            rid = f"{gen.request_id}-{i}"
            routes.append(self.planner.plan(rid, gen.prompts[i // gen.n], gen.max_tokens, session_id))
        return routes

    @staticmethod
    def route_header(routes: list[Route]) -> str:
        return ",".join(dict.fromkeys(r.header() for r in routes))

    async def run(self, gen: GenerationRequest, routes: list[Route]) -> AsyncIterator[ChoiceDelta]:
        """All choices' deltas, with TTFT / ITL / end-to-end and token counts recorded."""
        m = self.metrics
        mode = routes[0].mode
        for r in routes:
            m.decisions.labels(r.mode).inc()
            m.decision_time.observe(r.decision_us / 1e6)
        m.in_flight.inc()
        t0 = gen.arrival
        last = 0.0
        tl = timeline.current()
        try:
            async for d in self._run_all(gen, routes):
                if d.token_ids:
                    now = time.perf_counter()
                    if tl is not None:
                        tl.token(now, len(d.token_ids))
                    if not last:
                        m.ttft.labels(mode).observe(now - t0)
                    else:
                        gap = (now - last) / len(d.token_ids)
                        for _ in d.token_ids:
                            m.itl.observe(gap)
                    last = now
                if d.finish_reason is not None:
                    m.output_tokens.inc(d.completion_tokens)
                    m.cached_tokens.inc(d.cached_tokens)
                yield d
        finally:
            m.in_flight.dec()
            m.input_tokens.inc(sum(len(p) for p in gen.prompts))
            m.e2e.labels(mode).observe(time.perf_counter() - t0)

    async def _run_all(self, gen: GenerationRequest, routes: list[Route]) -> AsyncIterator[ChoiceDelta]:
        if gen.num_choices == 1:
            async for delta in self._run_choice(gen, 0, routes[0]):
                yield delta
            return
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for delta in self._run_choice(gen, i, routes[i]):
                    queue.put_nowait(delta)
            except BaseException as exc:  # forwarded to the consumer, which re-raises
                queue.put_nowait(exc)
            else:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(gen.num_choices)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _run_choice(
        self, gen: GenerationRequest, index: int, route: Route
    ) -> AsyncIterator[ChoiceDelta]:
        rid = f"{gen.request_id}-{index}"
        prompt = gen.prompts[index // gen.n]
        choice = _Choice(self, gen, index)
        request = pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=gen.sampling(index))
        handle_owner: WorkerClient | None = None
        try:
            if route.prefill is not None:
                first = await self._prefill(route, request)
                if first is not None:
                    pre, result = first
                    self.planner.first_token(rid)
                    delta = choice.chunk(result.first)
                    done = (
                        delta.finish_reason is not None
                        or result.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                    )
                    if done or not result.handle.token:
                        # NOTE: nothing to pull (the first token ended it): release and finish here
                        await self._release(pre, rid, result.handle.token)
                        if delta.finish_reason is None:
                            delta.finish_reason = FINISH_NAMES.get(result.finish_reason, "stop")
                        delta.prompt_tokens, delta.cached_tokens = len(prompt), result.num_cached_tokens
                        delta.completion_tokens = choice.num_tokens
                        yield delta
                        return
                    handle_owner = pre
                    request.generated_token_ids.extend(result.first.token_ids)
                    request.kv_handle.CopyFrom(result.handle)
                    cached = result.num_cached_tokens
                    yield delta
                else:
                    cached = 0  # prefill pool unreachable: the decode worker prefills locally
            async for delta in self._decode(route, request, choice, prompt):
                if handle_owner is not None:
                    handle_owner = None  # the decode worker has pulled and released it
                if route.prefill is not None and delta.finish_reason is not None:
                    delta.cached_tokens = max(delta.cached_tokens, cached)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if handle_owner is not None:
                _spawn(self._release(handle_owner, rid, request.kv_handle.token))
            self.planner.finished(rid)

    async def _prefill(
        self, route: Route, request: pb.DecodeRequest
    ) -> tuple[WorkerClient, pb.PrefillResult] | None:
        """Prefill leg with failover to another prefill worker; None when none is reachable."""
        worker: WorkerClient | None = route.prefill
        tried: set[str] = set()
        msg = pb.PrefillRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, params=request.params
        )
        while worker is not None:
            current = worker
            tried.add(current.address)
            current.in_flight += 1
            span, metadata = _client_span("prefill", current)
            try:
                resp = await current.stub.Prefill(msg, metadata=metadata)
            except asyncio.CancelledError:
                # NOTE: the client left while the worker may already have pinned the prompt's
                # blocks and published a handle we will never see: release it by request id
                _spawn(self._release(current, request.request_id, b"", by_id=True))
                raise
            except grpc.aio.AioRpcError as exc:
                self._fault(current, exc)
                if exc.code() not in _RETRYABLE:
                    detail = f"prefill worker {current.worker_id} failed: {exc.details()}"
                    raise ApiError(502, detail, None, "worker_error") from exc
                others = [
                    w for w in self.pool.healthy("prefill") if w.role == "prefill" and w.address not in tried
                ]
                worker = others[0] if others else None
                continue
            finally:
                current.in_flight -= 1
                _end(span)
            if resp.WhichOneof("result") == "error":
                raise _worker_error(resp.error)
            self.pool.succeeded(worker)
            _worker_timing(prefill_queue_ms=resp.ok.queue_ms, prefill_compute_ms=resp.ok.compute_ms)
            route.prefill = worker
            return worker, resp.ok
        route.prefill, route.mode = None, "aggregated"  # NOTE: the decode worker prefills itself
        return None

    async def _decode(
        self, route: Route, request: pb.DecodeRequest, choice: _Choice, prompt: list[int]
    ) -> AsyncIterator[ChoiceDelta]:
        worker = route.decode
        tried: set[str] = set()
        migrations = 0
        while True:
            tried.add(worker.address)
            current = worker
            span, metadata = _client_span("decode", current)
            call = current.stub.Decode(request, metadata=metadata)
            current.in_flight += 1
            got_any = False
            try:
                while True:
                    try:
                        # NOTE: not wait_for: on 3.11 it wraps every read (every token) in a new task
                        async with asyncio.timeout(self.idle_timeout_s):
                            resp = await call.read()
                    except TimeoutError:
                        raise _StreamBroke(
                            f"worker {current.worker_id} sent nothing for {self.idle_timeout_s:g} s"
                        ) from None
                    if resp is grpc.aio.EOF:
                        break
                    got_any = True
                    kind = resp.WhichOneof("kind")
                    if kind == "chunk":
                        delta = choice.chunk(resp.chunk)
                        if delta.finish_reason is not None:  # a stop string
                            delta.prompt_tokens = len(prompt)
                            delta.completion_tokens = choice.num_tokens
                            call.cancel()
                        yield delta
                        if delta.finish_reason is not None:
                            return
                    elif kind == "complete":
                        c = resp.complete
                        self.pool.succeeded(current)
                        _worker_timing(decode_queue_ms=c.queue_ms, kv_transfer_ms=c.kv_transfer_ms)
                        reason = FINISH_NAMES.get(c.finish_reason, "stop")
                        yield choice.finish(reason, c.num_prompt_tokens, c.num_cached_tokens)
                        return
                    else:
                        raise _worker_error(resp.error)
                raise _StreamBroke(f"worker {current.worker_id} ended the stream without completing")
            except (grpc.aio.AioRpcError, _StreamBroke) as exc:
                broke = got_any or isinstance(exc, _StreamBroke)
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                self._fault(current, exc)
                if not broke and code not in _RETRYABLE:
                    raise ApiError(
                        502, f"worker {current.worker_id} failed: {exc.details()}", None, "worker_error"
                    ) from exc
                others = [w for w in self.pool.healthy("decode") if w.address not in tried]
                if broke:
                    # NOTE: mid-generation: resume on another worker from the prompt + every token
                    # the client already has (it recomputes their KV); the stream goes on unbroken
                    if migrations >= self.migration_limit or not others:
                        raise ApiError(
                            502,
                            f"worker {current.worker_id} failed mid-stream after {choice.num_tokens} tokens "
                            f"and no migration was possible ({migrations} of {self.migration_limit} used)",
                            None,
                            "worker_error",
                        ) from exc
                    migrations += 1
                    self.metrics.migrations.inc()
                    log.warning(
                        "%s: worker %s broke after %d tokens (%s); migrating to %s",
                        request.request_id, current.worker_id, choice.num_tokens, _why(exc),
                        others[0].worker_id,
                    )  # fmt: skip
                    request.generated_token_ids[:] = choice.token_ids
                    request.ClearField("kv_handle")
                    if request.params.max_tokens - len(choice.token_ids) <= 0:
                        yield choice.finish("length", len(prompt), 0)
                        return
                elif not others:
                    raise ApiError(
                        503,
                        "No healthy decode worker is available; try again shortly.",
                        None,
                        "no_healthy_worker",
                    ) from exc
                worker = route.decode = others[0]
            finally:
                current.in_flight -= 1
                call.cancel()
                _end(span)

    def _fault(self, worker: WorkerClient, exc: grpc.aio.AioRpcError | _StreamBroke) -> None:
        """Count a failed call against the worker's circuit breaker if it was the worker's fault."""
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        if code is None or code in _WORKER_FAULTS:
            self.pool.failed(worker, unreachable=code == grpc.StatusCode.UNAVAILABLE)

    async def _release(
        self, worker: WorkerClient, request_id: str, token: bytes, by_id: bool = False
    ) -> None:
        """Give a handle back; `by_id` (no token: the router never saw it) releases whatever that
        request pinned there. Idempotent on the worker."""
        if not token and not by_id:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await worker.stub.Release(pb.ReleaseRequest(request_id=request_id, token=token), timeout=5)


_background: set[asyncio.Future] = set()


def _spawn(coro) -> None:
    """Run `coro` to completion even if the request's task is cancelled (kept referenced)."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _logprobs(chunk: pb.TokenChunk) -> list[TokenLogprob]:
    tops = chunk.top_logprobs
    out = []
    for i, (tid, lp) in enumerate(zip(chunk.token_ids, chunk.logprobs)):
        top = list(zip(tops[i].token_ids, tops[i].logprobs)) if i < len(tops) else []
        out.append(TokenLogprob(tid, lp, top))
    return out

"""gRPC Worker service over an engine.

Prefill lifecycle: compute the prompt with its blocks pinned -> first token -> publish the
blocks as a KV handle (unless the first token already ends the request) -> PrefillResult.
Decode lifecycle: validate -> pull the handle's blocks the local prefix cache lacks and release
the handle as soon as the copy is over (or recompute on any transfer failure) -> generate with
continuous batching -> stream token chunks, coalescing whatever is ready -> Complete. A client
that goes away closes the generator, which aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from pdrouter_proto import worker_pb2 as pb
from pdrouter_proto import worker_pb2_grpc as pb_grpc
from workers.engine.block_manager import KvEvent
from workers.engine.engine import Engine, EngineError, LoadReport
from workers.engine.sequence import FinishReason, SamplingParams
from workers.kv_agent import KvAgent
from workers.telemetry import extract_context, metadata_dict

VERSION = "0.1.0"
ROLES = {"both": pb.ROLE_BOTH, "prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE}
FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def params_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        max_tokens=p.max_tokens,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def load_to_pb(load: LoadReport) -> pb.LoadReport:
    return pb.LoadReport(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_total=load.kv_blocks_total,
        queued_prefill_tokens=load.queued_prefill_tokens,
    )


_tracer = trace.get_tracer("pdrouter.worker")


def _server_span(name: str, context: grpc.aio.ServicerContext | None, request_id: str, prompt_tokens: int):
    """The worker's span of one RPC, a child of the router's (traceparent in the metadata)."""
    parent = extract_context(metadata_dict(context.invocation_metadata())) if context is not None else None
    return _tracer.start_span(
        name, context=parent, kind=SpanKind.SERVER,
        attributes={"pdrouter.request_id": request_id, "gen_ai.usage.input_tokens": prompt_tokens},
    )  # fmt: skip


def _error(request_id: str, exc: EngineError) -> pb.Error:
    return pb.Error(code=grpc.StatusCode[exc.code].value[0], message=str(exc))


class _Subscription:
    """One subscriber's queue; bounded so a stuck router cannot grow worker memory forever."""

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.WorkerEvent | None] = asyncio.Queue()
        self.seq = 0
        self.overflowed = False

    def put(self, event: pb.WorkerEvent) -> None:
        if self.queue.qsize() >= self.MAX_PENDING:
            self.overflowed = True  # NOTE: the router sees the stream end and resubscribes
            self.queue.put_nowait(None)
            return
        self.seq += 1
        event.seq = self.seq
        self.queue.put_nowait(event)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, *, worker_id: str, role: str, engine_kind: str, load_interval_s: float = 0.5):
        self.engine: Engine = None  # type: ignore[assignment]  # set by attach() once loaded
        self.worker_id = worker_id
        self.role = role
        self.engine_kind = engine_kind
        self.instance_id = secrets.randbits(63)
        self.load_interval_s = load_interval_s
        self._subs: set[_Subscription] = set()
        self.kv: KvAgent | None = None
        self.draining = False
        self.num_active = 0  # Prefill and Decode calls in progress (what a drain waits for)

    def attach(self, engine: Engine, kv: KvAgent | None = None) -> None:
        """Serve `engine`; until then every RPC answers UNAVAILABLE (the model is loading)."""
        engine.event_listeners.append(self._on_kv_events)
        self.kv = kv
        self.engine = engine

    def load_report(self) -> pb.LoadReport:
        report = load_to_pb(self.engine.load())
        if self.kv is not None:
            report.kv_transfer.CopyFrom(self.kv.snapshot())
        return report

    async def _ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.engine is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is still loading its model"
            )

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """New work only while not draining; UNAVAILABLE makes the router try another worker."""
        await self._ready(context)
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining (shutting down)"
            )

    def drain(self) -> None:
        """Refuse new Prefill, Decode and Subscribe calls and end the open event streams (the router
        marks this worker unhealthy when its stream ends); calls in flight go on."""
        self.draining = True
        for sub in self._subs:
            sub.queue.put_nowait(None)

    def busy(self) -> bool:
        """Calls in flight, or KV handles still pinned for a decode worker to pull."""
        return self.num_active > 0 or (self.kv is not None and self.kv.registry.num_pinned > 0)

    # -- Info -------------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        await self._ready(context)
        spec = self.engine.spec
        lay = spec.layout
        return pb.InfoResponse(
            worker_id=self.worker_id,
            role=ROLES[self.role],
            model=spec.name,
            engine=self.engine_kind,
            block_size=lay.block_size,
            num_blocks=self.engine.block_manager.num_blocks,
            max_model_len=self.engine.scheduler.config.max_model_len,
            vocab_size=spec.vocab_size,
            eos_token_ids=spec.eos_token_ids,
            layout=pb.KvLayout(
                dtype=lay.dtype,
                num_layers=lay.num_layers,
                num_kv_heads=lay.num_kv_heads,
                head_dim=lay.head_dim,
                block_size=lay.block_size,
            ),
            version=VERSION,
            instance_id=self.instance_id,
            transfer_endpoint=self.kv.endpoint if self.kv is not None else "",
        )

    # -- Prefill / Decode -------------------------------------------------------------------

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        await self._admit(context)
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        params = params_from_pb(request.params)
        wanted, params.max_tokens = params.max_tokens, 1
        first = pb.TokenChunk()
        t0 = time.monotonic()
        span = _server_span("prefill", context, rid, len(prompt))
        self.num_active += 1
        try:
            async for out in self.engine.generate(rid, prompt, params, pin_on_finish=self.kv is not None):
                _fill_chunk(first, out)
                if out.finish_reason is not None:
                    queue_ms = out.queue_s * 1e3
                    result = pb.PrefillResult(
                        first=first,
                        num_prompt_tokens=out.num_prompt_tokens,
                        num_cached_tokens=out.num_cached_tokens,
                        queue_ms=queue_ms,
                        compute_ms=(time.monotonic() - t0) * 1e3 - queue_ms,
                    )
                    span.set_attributes(
                        {"pdrouter.queue_ms": result.queue_ms, "pdrouter.compute_ms": result.compute_ms,
                         "pdrouter.cached_tokens": out.num_cached_tokens}
                    )  # fmt: skip
                    ended = out.finish_reason is not FinishReason.LENGTH or wanted <= 1
                    if ended:  # nothing for a decode worker to do: no handle, blocks back now
                        result.finish_reason = FINISH[out.finish_reason]
                    if out.pinned_block_ids is not None and self.kv is not None:
                        if ended:
                            self.engine.unpin(rid)
                        else:
                            result.handle.CopyFrom(self.kv.publish(rid, out.pinned_block_ids, len(prompt)))
                    return pb.PrefillResponse(request_id=rid, ok=result)
        except EngineError as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            return pb.PrefillResponse(request_id=request.request_id, error=_error(request.request_id, exc))
        finally:
            self.num_active -= 1
            span.end()
        return pb.PrefillResponse(
            request_id=request.request_id,
            error=pb.Error(code=grpc.StatusCode.ABORTED.value[0], message="aborted"),
        )

    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        await self._admit(context)
        rid = request.request_id
        params = params_from_pb(request.params)
        prior = list(request.generated_token_ids)
        prompt = list(request.prompt_token_ids)
        if prior:
            params.max_tokens -= len(prior)
        num_prompt = len(prompt)
        num_out = 0
        handle = request.kv_handle if request.HasField("kv_handle") and self.kv is not None else None
        span = _server_span("decode", context, rid, num_prompt)
        parent = trace.set_span_in_context(span)
        kv_import = self.kv.importer(rid, handle, parent) if handle is not None else None
        gen = self.engine.generate(
            rid, prompt + prior, params, kv_import=kv_import, num_user_prompt_tokens=len(prompt)
        )
        self.num_active += 1
        try:
            async for out in gen:
                if out.token_ids:
                    num_out += len(out.token_ids)
                    chunk = pb.TokenChunk()
                    _fill_chunk(chunk, out)
                    yield pb.DecodeResponse(request_id=rid, chunk=chunk)
                if out.finish_reason is not None:
                    complete = pb.Complete(
                        finish_reason=FINISH[out.finish_reason],
                        num_prompt_tokens=num_prompt,
                        num_cached_tokens=min(out.num_cached_tokens, num_prompt),
                        num_output_tokens=num_out + len(prior),
                        queue_ms=out.queue_s * 1e3,
                        kv_transfer_ms=out.kv_pull_s * 1e3,
                    )
                    span.set_attributes(
                        {"pdrouter.queue_ms": complete.queue_ms, "gen_ai.usage.output_tokens": num_out,
                         "pdrouter.cached_tokens": complete.num_cached_tokens}
                    )  # fmt: skip
                    yield pb.DecodeResponse(request_id=rid, complete=complete)
        except EngineError as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            yield pb.DecodeResponse(request_id=rid, error=_error(rid, exc))
        finally:
            self.num_active -= 1
            await gen.aclose()
            span.end()
            if kv_import is not None and not kv_import.released:  # ended before its pull ran
                self.kv.release_later((rid, handle))  # type: ignore[union-attr,arg-type]

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        """The router gives a handle back (decode leg failed or the client left); idempotent."""
        await self._ready(context)
        released = self.kv is not None and self.kv.release(request.request_id, request.token)
        return pb.ReleaseResponse(released=released)

    # -- Subscribe --------------------------------------------------------------------------

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WorkerEvent]:
        await self._admit(context)
        sub = _Subscription()
        interval = request.load_interval_s or self.load_interval_s
        snapshot = pb.Snapshot(
            instance_id=self.instance_id,
            block_hashes=self.engine.block_manager.cached_hashes(),
            load=self.load_report(),
        )
        sub.put(pb.WorkerEvent(snapshot=snapshot))
        self._subs.add(sub)
        ticker = asyncio.create_task(self._tick_load(sub, interval))
        try:
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                yield event
        finally:
            ticker.cancel()
            self._subs.discard(sub)

    async def _tick_load(self, sub: _Subscription, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            sub.put(pb.WorkerEvent(load=self.load_report()))

    def _on_kv_events(self, events: list[KvEvent]) -> None:
        if not self._subs:
            return
        for ev in events:
            for sub in self._subs:
                sub.put(_event_to_pb(ev))


def _event_to_pb(ev: KvEvent) -> pb.WorkerEvent:
    if ev.kind == "stored":
        stored = pb.KvStored(block_hashes=ev.block_hashes)
        if ev.parent_hash is not None:
            stored.parent_hash = ev.parent_hash
        return pb.WorkerEvent(stored=stored)
    if ev.kind == "removed":
        return pb.WorkerEvent(removed=pb.KvRemoved(block_hashes=ev.block_hashes))
    return pb.WorkerEvent(cleared=pb.KvCleared())


def _fill_chunk(chunk: pb.TokenChunk, out) -> None:
    chunk.token_ids.extend(out.token_ids)
    if out.logprobs is not None:
        chunk.logprobs.extend(out.logprobs)
        for top in out.top_logprobs or ():
            chunk.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])

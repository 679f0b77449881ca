"""The engine loop: a thread that steps scheduler -> runner -> scheduler, and the asyncio side.

Request lifecycle: `generate()` validates and enqueues -> the loop thread admits it (prefix
match, allocate) -> steps run prefill chunks then decodes -> every step's new tokens go to
the event loop in ONE `call_soon_threadsafe` (not one per token) -> the request's queue
yields them, coalesced when the consumer lags -> finish or abort frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec

from workers.engine.block_manager import BlockManager, KvEvent
from workers.engine.runner import ModelSpec, Runner
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import FinishReason, KvImport, SamplingParams, Sequence

log = logging.getLogger("pdrouter.engine")


class EngineError(Exception):
    """A request the engine refuses; `code` is a gRPC status name."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


class LoadReport(msgspec.Struct, array_like=True, gc=False):
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    queued_prefill_tokens: int


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one request since the last output (several when the consumer lagged)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    pinned_block_ids: list[int] | None = None  # prefill leg: blocks kept until unpin()
    kv_pulled_blocks: int | None = None  # decode leg: blocks pulled (None: no pull; -1: pull failed)
    queue_s: float = 0.0  # waiting before the engine first gave the request blocks
    kv_pull_s: float = 0.0  # decode leg: the prompt KV pull


@dataclass(frozen=True, slots=True)
class AddRequest:
    seq: Sequence


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Unpin:
    """A finished prefill leg's blocks may go back to the pool (pulled, released or expired)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class ImportDone:
    """A decode leg's pull ended: its prompt KV is in place (`ok`) or must be recomputed."""

    request_id: str
    ok: bool


InboxMessage = AddRequest | AbortRequest | Unpin | ImportDone


class _Stream:
    """Per-request mailbox filled by the loop thread (via the event loop) and drained by generate()."""

    __slots__ = ("event", "pending", "seq", "want_logprobs")

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.pending: list = []  # (token_id, SampledToken | None, finish_reason | None)
        self.event = asyncio.Event()
        self.want_logprobs = seq.params.logprobs is not None


class Engine:
    def __init__(
        self,
        runner: Runner,
        scheduler_config: SchedulerConfig | None = None,
        adapter: str | None = None,
    ) -> None:
        self.runner = runner
        self.spec: ModelSpec = runner.spec
        cfg = scheduler_config or SchedulerConfig()
        cfg.max_model_len = min(cfg.max_model_len, self.spec.max_model_len)
        self._events: list[KvEvent] = []
        self.block_manager = BlockManager(
            runner.num_blocks, self.spec.layout.block_size, on_event=self._events.append, adapter=adapter
        )
        self.scheduler = Scheduler(cfg, self.block_manager, self.spec.eos_token_ids)
        self._streams: dict[str, _Stream] = {}
        self._inbox: list[InboxMessage] = []  # from the event loop to the loop thread
        self._cv = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.event_listeners: list[Callable[[list[KvEvent]], None]] = []
        self.num_steps = 0
        self._pulls: set[asyncio.Future] = set()
        self.num_generated_tokens = 0
        self.max_waiting = 0  # admission: refuse new requests while this many wait (0: no limit)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def load(self) -> LoadReport:
        sch = self.scheduler
        return LoadReport(
            len(sch.running),
            len(sch.waiting),
            self.block_manager.num_used_blocks,
            self.block_manager.num_blocks,
            sch.queued_prefill_tokens(),
        )

    # -- asyncio side -----------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        limit = self.scheduler.config.max_model_len
        if n == 0:
            raise EngineError("prompt is empty")
        if n >= limit:
            raise EngineError(f"prompt has {n} tokens; this model's context length is {limit}")
        if params.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}")
        vocab = self.spec.vocab_size
        bad = next((t for t in prompt_token_ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise EngineError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if self.max_waiting and len(self._streams) - len(self.scheduler.running) >= self.max_waiting:
            raise EngineError(
                f"worker queue is full ({self.max_waiting} requests waiting); try another worker or later",
                "RESOURCE_EXHAUSTED",
            )
        bs = self.block_manager.block_size
        need = -(-min(n + params.max_tokens, limit) // bs)
        if need > self.block_manager.num_blocks:
            raise EngineError(
                f"request needs up to {need} KV blocks ({n} prompt + {params.max_tokens} new tokens) "
                f"but the pool has {self.block_manager.num_blocks}",
                "RESOURCE_EXHAUSTED",
            )

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        pin_on_finish: bool = False,
        kv_import: KvImport | None = None,
        num_user_prompt_tokens: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield new tokens as they come; closing the iterator early aborts the request.

        `pin_on_finish`: keep the blocks after finishing (a prefill leg) until `unpin()`.
        `kv_import`: pull the first `kv_import.num_tokens` tokens' KV instead of computing it.
        """
        self.validate(prompt_token_ids, params)
        if request_id in self._streams or request_id in self.scheduler.pinned:
            raise EngineError(f"request id {request_id!r} is already running", "ALREADY_EXISTS")
        seq = Sequence(request_id, prompt_token_ids, params, time.monotonic())
        seq.pin_on_finish = pin_on_finish
        seq.kv_import = kv_import
        if num_user_prompt_tokens is not None:
            seq.num_user_prompt_tokens = num_user_prompt_tokens
        stream = _Stream(seq)
        self._streams[request_id] = stream
        self._submit(AddRequest(seq))
        finished = False
        try:
            while True:
                await stream.event.wait()
                stream.event.clear()
                items, stream.pending = stream.pending, []
                out = RequestOutput(
                    num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens
                )
                if seq.first_scheduled_time:
                    out.queue_s = seq.first_scheduled_time - seq.arrival_time
                if kv_import is not None:
                    out.kv_pull_s = kv_import.seconds
                if stream.want_logprobs:
                    out.logprobs, out.top_logprobs = [], []
                for token_id, sampled, reason in items:
                    if isinstance(sampled, Exception):
                        finished = True
                        raise EngineError(f"engine step failed: {sampled}", "INTERNAL")
                    if token_id is not None:
                        out.token_ids.append(token_id)
                        if out.logprobs is not None and sampled is not None:
                            out.logprobs.append(sampled.logprob if sampled.logprob is not None else 0.0)
                            out.top_logprobs.append(sampled.top_logprobs or [])
                    if reason is not None:
                        out.finish_reason = reason
                if out.finish_reason is not None:
                    finished = True
                    if pin_on_finish and out.finish_reason is not FinishReason.ABORT:
                        out.pinned_block_ids = list(seq.block_table)
                    if kv_import is not None:
                        out.kv_pulled_blocks = kv_import.num_pulled_blocks if kv_import.ok else -1
                    yield out
                    return
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(AbortRequest(request_id))

    def unpin(self, request_id: str) -> None:
        """Release a finished prefill leg's blocks (after the pull, or on expiry)."""
        self._submit(Unpin(request_id))

    def _submit(self, message: InboxMessage) -> None:
        with self._cv:
            self._inbox.append(message)
            self._cv.notify()

    def _deliver(
        self, outputs: list[tuple[str, int | None, object, FinishReason | None]], events: list[KvEvent]
    ) -> None:
        streams = self._streams
        for request_id, token_id, sampled, reason in outputs:
            stream = streams.get(request_id)
            if stream is not None:
                stream.pending.append((token_id, sampled, reason))
                stream.event.set()
        if events:
            for listener in self.event_listeners:
                listener(events)

    # -- loop thread ------------------------------------------------------------------------

    def _drain_inbox(self) -> list[tuple[str, int | None, object, FinishReason | None]]:
        with self._cv:
            while not self._inbox and not self.scheduler.num_unfinished and not self._stopping:
                self._cv.wait()
            inbox, self._inbox = self._inbox, []
        outputs = []
        for message in inbox:
            match message:
                case AddRequest(seq):
                    self.scheduler.add(seq)
                case Unpin(request_id):
                    self.scheduler.unpin(request_id)
                case ImportDone(request_id, ok):
                    seq = self.scheduler.import_done(request_id, ok)
                    if seq is not None and seq.is_finished:
                        self.runner.free(request_id)
                case AbortRequest(request_id):
                    if self.scheduler.abort(request_id) is not None:
                        self.runner.free(request_id)
        return outputs

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        load = getattr(self.runner, "load", None)
        if load is not None:
            try:
                load()  # NOTE: on this thread: see workers/engine/model_runner.py's module note
            except Exception:  # the first step retries and fails its requests with the reason
                log.exception("loading the model failed")
        while True:
            outputs = self._drain_inbox()
            if self._stopping:
                return
            batch = self.scheduler.schedule()
            if self.scheduler.new_imports:
                imports, self.scheduler.new_imports = self.scheduler.new_imports, []
                loop.call_soon_threadsafe(self._start_imports, imports)
            if not batch:
                if self.scheduler.num_unfinished:
                    # NOTE: nothing fits right now (pool full of pinned blocks); wait for a change.
                    with self._cv:
                        self._cv.wait(timeout=0.01)
                continue
            try:
                sampled = self.runner.execute(batch)
            except Exception as exc:  # a broken step must not kill every request silently
                self._fail_batch(batch, exc)
                continue
            self.num_steps += 1
            finished = self.scheduler.postprocess(batch, sampled)
            for item, tok in zip(batch, sampled):
                seq = item.seq
                if tok is not None and seq.finish_reason is not FinishReason.ABORT:
                    reason = seq.finish_reason if seq.is_finished else None
                    outputs.append((seq.request_id, tok.token_id, tok, reason))
            self.num_generated_tokens += sum(1 for t in sampled if t is not None)
            for seq in finished:
                self.runner.free(seq.request_id)
            events, self._events[:] = list(self._events), []
            if outputs or events:
                loop.call_soon_threadsafe(self._deliver, outputs, events)

    def _start_imports(self, seqs: list[Sequence]) -> None:
        bs = self.block_manager.block_size
        for seq in seqs:
            imp = seq.kv_import
            assert imp is not None
            first = seq.num_computed_tokens // bs  # blocks already held locally
            last = -(-imp.num_tokens // bs)
            src, dst = imp.src_block_ids[first:last], seq.block_table[first:last]
            task = asyncio.ensure_future(self._pull(seq.request_id, imp, src, dst))
            self._pulls.add(task)
            task.add_done_callback(self._pulls.discard)

    async def _pull(self, request_id: str, imp: KvImport, src: list[int], dst: list[int]) -> None:
        """Always called, with no ids when the prefix cache held every block: the import's end
        is also when the handle goes back to the prefill worker."""
        ok = True
        t0 = time.monotonic()
        try:
            await imp.pull(src, dst)
            imp.num_pulled_blocks = len(src)
        except Exception as exc:  # NOTE: any transfer failure falls back to local recompute
            log.warning("KV pull for %s failed (%s); recomputing locally", request_id, exc)
            ok = False
        if src:
            imp.seconds = time.monotonic() - t0
        self._submit(ImportDone(request_id, ok))

    def _fail_batch(self, batch, exc: Exception) -> None:
        outputs = []
        for item in batch:
            seq = self.scheduler.abort(item.seq.request_id)
            if seq is not None:
                self.runner.free(seq.request_id)
                outputs.append((seq.request_id, None, exc, FinishReason.ABORT))
        events, self._events[:] = list(self._events), []
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outputs, events)

"""Runs one GenerationRequest against the workers and yields text deltas per choice.

Per choice: route (pick a worker) -> Decode stream (the worker prefills locally: the
aggregated path) -> incremental detokenization -> stop strings -> deltas. A worker that
is unreachable before its first token is marked unhealthy and the choice is retried on
another; cancelling the consumer cancels the gRPC call, which aborts the work and frees
the blocks on the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdrouter_proto import worker_pb2 as pb
from router.detokenizer import IncrementalDetokenizer
from router.errors import ApiError
from router.policy import RoundRobin
from router.requests import GenerationRequest
from router.stop_strings import StopStringMatcher
from router.tokenizer import Tokenizer
from router.worker_pool import WorkerClient, WorkerPool

FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
# Worker error code (grpc.StatusCode value) -> HTTP status.
_HTTP_FROM_GRPC = {3: 400, 5: 404, 6: 409, 8: 429, 9: 400, 11: 400, 14: 503, 4: 504}


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


@dataclass(slots=True)
class Route:
    mode: str
    workers: list[WorkerClient]

    def header(self) -> str:
        ids = ",".join(dict.fromkeys(w.worker_id for w in self.workers))
        return f"mode={self.mode};decode={ids}"


class Orchestrator:
    def __init__(self, pool: WorkerPool, tokenizer: Tokenizer) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.policy = RoundRobin()

    def _pick(self, exclude: set[str] = frozenset()) -> WorkerClient:  # type: ignore[assignment]
        candidates = [w for w in self.pool.healthy("decode") if w.address not in exclude]
        if not candidates:
            raise ApiError(
                503,
                "No healthy worker is available to serve this request; try again shortly.",
                None,
                "no_healthy_worker",
            )
        return self.policy.pick(candidates)

    def route(self, gen: GenerationRequest) -> Route:
        """Choose a worker per choice before any byte is sent (so errors are still clean 5xx)."""
        return Route("aggregated", [self._pick() for _ in range(gen.num_choices)])

    async def run(self, gen: GenerationRequest, route: Route) -> AsyncIterator[ChoiceDelta]:
        if gen.num_choices == 1:
            async for delta in self._run_choice(gen, 0, route.workers[0]):
                yield delta
            return
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for delta in self._run_choice(gen, i, route.workers[i]):
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
        self, gen: GenerationRequest, index: int, worker: WorkerClient
    ) -> AsyncIterator[ChoiceDelta]:
        prompt = gen.prompts[index // gen.n]
        request = pb.DecodeRequest(
            request_id=f"{gen.request_id}-{index}", prompt_token_ids=prompt, params=gen.sampling(index)
        )
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(gen.stop) if gen.stop else None
        tried: set[str] = set()
        completion_tokens = 0
        while True:
            tried.add(worker.address)
            current = worker
            call = current.stub.Decode(request)
            current.in_flight += 1
            got_any = False
            try:
                async for resp in call:
                    got_any = True
                    kind = resp.WhichOneof("kind")
                    if kind == "chunk":
                        chunk = resp.chunk
                        completion_tokens += len(chunk.token_ids)
                        delta = ChoiceDelta(index, token_ids=list(chunk.token_ids))
                        text = detok.add(chunk.token_ids)
                        if gen.logprobs is not None:
                            delta.logprobs = _logprobs(chunk)
                        if stops is not None:
                            text, hit = stops.feed(text)
                            if hit:
                                delta.text = text
                                delta.finish_reason = "stop"
                                delta.completion_tokens = completion_tokens
                                delta.prompt_tokens = len(prompt)
                                call.cancel()
                                yield delta
                                return
                        delta.text = text
                        yield delta
                    elif kind == "complete":
                        c = resp.complete
                        tail = detok.flush() if hasattr(detok, "flush") else ""
                        if stops is not None:
                            text, hit = stops.feed(tail)
                            tail = text if hit else text + stops.flush()
                        yield ChoiceDelta(
                            index,
                            text=tail,
                            finish_reason=FINISH_NAMES.get(c.finish_reason, "stop"),
                            prompt_tokens=c.num_prompt_tokens,
                            cached_tokens=c.num_cached_tokens,
                            completion_tokens=c.num_output_tokens,
                        )
                        return
                    else:
                        err = resp.error
                        raise ApiError(_HTTP_FROM_GRPC.get(err.code, 500), err.message, None, "worker_error")
                raise ApiError(
                    502,
                    f"worker {worker.worker_id} ended the stream without completing",
                    None,
                    "worker_error",
                )
            except grpc.aio.AioRpcError as exc:
                if got_any or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    raise ApiError(
                        502, f"worker {worker.worker_id} failed: {exc.details()}", None, "worker_error"
                    ) from exc
                worker.mark_unhealthy()
                worker = self._pick(exclude=tried)
            finally:
                current.in_flight -= 1
                call.cancel()


def _logprobs(chunk: pb.TokenChunk) -> list[TokenLogprob]:
    tops = chunk.top_logprobs
    out = []
    for i, (tid, lp) in enumerate(zip(chunk.token_ids, chunk.logprobs)):
        top = list(zip(tops[i].token_ids, tops[i].logprobs)) if i < len(tops) else []
        out.append(TokenLogprob(tid, lp, top))
    return out


def now_s() -> int:
    return int(time.time())

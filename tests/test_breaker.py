"""Worker health: the circuit breaker (passive ejection, half-open health probe, re-admission)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdrouter_proto import worker_pb2 as pb
from pdrouter_proto import worker_pb2_grpc as pb_grpc
from router.breaker import Breaker
from router.orchestrator import Orchestrator, _StreamBroke
from router.worker_pool import WORKER_SERVICE, WorkerPool
from tests.procs import free_port


@pytest.mark.unit
def test_opens_after_threshold_failures_in_a_row_and_a_success_resets() -> None:
    b = Breaker(threshold=3, cooldown_s=1.0)
    assert not b.failure() and not b.failure()
    b.success()
    assert not b.failure() and not b.failure()
    assert b.failure() and b.open  # the third in a row
    assert not b.failure()  # already open: opens once


@pytest.mark.unit
def test_unreachable_opens_at_once() -> None:
    b = Breaker(threshold=3)
    assert b.failure(unreachable=True) and b.open


@pytest.mark.unit
def test_half_open_readmits_one_failure_short_and_backs_off_when_it_fails_again() -> None:
    b = Breaker(threshold=3, cooldown_s=1.0, max_cooldown_s=3.0)
    b.failure(unreachable=True)
    b.probed(serving=False)
    assert b.open and b.cooldown_s == 2.0
    b.probed(serving=True)
    assert not b.open and b.failures == 2
    assert b.failure() and b.cooldown_s == 3.0  # one more failure reopens it, and waits longer (capped)
    b.probed(serving=True)
    b.success()
    assert (b.failures, b.cooldown_s, b.trips) == (0, 1.0, 0)


class _FakeWorker(pb_grpc.WorkerServicer):
    """Info and an event stream that stay fine, whatever its requests do."""

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(worker_id="fake", role=pb.ROLE_BOTH, block_size=16, instance_id=7)

    async def Subscribe(self, request: pb.SubscribeRequest, context) -> AsyncIterator[pb.WorkerEvent]:
        yield pb.WorkerEvent(seq=1, snapshot=pb.Snapshot(instance_id=7))
        seq = 2
        while True:
            await asyncio.sleep(0.1)  # the load-report period of this fake
            yield pb.WorkerEvent(seq=seq, load=pb.LoadReport())
            seq += 1


async def _healthy(pool: WorkerPool, want: bool) -> None:
    async with asyncio.timeout(10):
        while pool.workers[0].healthy != want:
            pool._changed.clear()
            await pool._changed.wait()


@pytest.mark.integration
async def test_pool_ejects_a_failing_worker_probes_it_and_readmits_it() -> None:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(_FakeWorker(), server)
    status = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await status.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    pool = WorkerPool([f"127.0.0.1:{port}"], breaker_threshold=2, breaker_cooldown_s=0.05)
    try:
        pool.start()
        await _healthy(pool, True)
        w = pool.workers[0]
        pool.failed(w)
        assert w.healthy  # one failure is not enough
        pool.failed(w)
        assert not w.healthy and w.ejections == 1 and w.stream_up  # ejected though its stream is up
        async with asyncio.timeout(10):
            while w.breaker.cooldown_s < 0.2:  # NOT_SERVING: each probe doubles the wait
                await asyncio.sleep(0.01)
        assert not w.healthy
        await status.set(WORKER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await _healthy(pool, True)  # the half-open probe let it back
        pool.failed(w)
        assert not w.healthy and w.ejections == 2  # half-open: one more failure ejects it again
        await _healthy(pool, True)
        pool.succeeded(w)
        assert (w.breaker.failures, w.breaker.trips, w.breaker.cooldown_s) == (0, 0, 0.05)
    finally:
        await pool.close()
        await server.stop(None)


# What a failed worker call means for the worker's circuit breaker (Orchestrator._fault), every
# gRPC code pinned: the worker's own faults count ("unreachable" ones open the breaker at once);
# the client's mistakes, a deadline, cancellation and load shedding do not.
C = grpc.StatusCode
COUNTS_AGAINST_WORKER: dict[grpc.StatusCode, str | None] = {
    C.OK: None,
    C.CANCELLED: None,
    C.UNKNOWN: "failure",
    C.INVALID_ARGUMENT: None,
    C.DEADLINE_EXCEEDED: None,
    C.NOT_FOUND: None,
    C.ALREADY_EXISTS: None,
    C.PERMISSION_DENIED: None,
    C.RESOURCE_EXHAUSTED: None,
    C.FAILED_PRECONDITION: None,
    C.ABORTED: None,
    C.OUT_OF_RANGE: None,
    C.UNIMPLEMENTED: None,
    C.INTERNAL: "failure",
    C.UNAVAILABLE: "unreachable",
    C.DATA_LOSS: "failure",
    C.UNAUTHENTICATED: None,
}


class _RecordingPool:
    def __init__(self) -> None:
        self.calls: list[tuple[object, bool]] = []

    def failed(self, worker, unreachable: bool = False) -> None:
        self.calls.append((worker, unreachable))


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} (test)")


@pytest.mark.unit
def test_every_grpc_code_is_classified() -> None:
    assert set(COUNTS_AGAINST_WORKER) == set(grpc.StatusCode)


@pytest.mark.unit
@pytest.mark.parametrize("code", list(COUNTS_AGAINST_WORKER), ids=lambda c: c.name)
def test_failed_call_counts_against_the_worker_by_its_code(code: grpc.StatusCode) -> None:
    pool = _RecordingPool()
    orch = Orchestrator(SimpleNamespace(pool=pool), tokenizer=None)  # type: ignore[arg-type]
    worker = object()
    orch._fault(worker, _rpc_error(code))  # type: ignore[arg-type]
    want = COUNTS_AGAINST_WORKER[code]
    assert pool.calls == ([] if want is None else [(worker, want == "unreachable")])


@pytest.mark.unit
def test_a_stream_that_broke_counts_against_the_worker() -> None:
    pool = _RecordingPool()
    orch = Orchestrator(SimpleNamespace(pool=pool), tokenizer=None)  # type: ignore[arg-type]
    orch._fault("w", _StreamBroke("ended the stream without completing"))  # type: ignore[arg-type]
    assert pool.calls == [("w", False)]


@pytest.mark.unit
async def test_only_worker_faults_eject_a_worker_from_the_pool() -> None:
    """Through the real pool and breaker (threshold 3): any number of calls failed by the client or
    by load leave the worker in; three internal errors eject it; one UNAVAILABLE ejects it at once."""
    pool = WorkerPool(["127.0.0.1:1", "127.0.0.1:2"], breaker_threshold=3, breaker_cooldown_s=60)
    orch = Orchestrator(SimpleNamespace(pool=pool), tokenizer=None)  # type: ignore[arg-type]
    a, b = pool.workers
    a.healthy = b.healthy = True
    try:
        for code, counted in COUNTS_AGAINST_WORKER.items():
            if counted is None:
                for _ in range(5):
                    orch._fault(a, _rpc_error(code))
        assert a.healthy and a.breaker.failures == 0 and a.ejections == 0
        orch._fault(a, _rpc_error(C.INTERNAL))
        orch._fault(a, _rpc_error(C.DATA_LOSS))
        assert a.healthy and a.breaker.failures == 2
        orch._fault(a, _rpc_error(C.UNKNOWN))
        assert not a.healthy and a.ejections == 1
        orch._fault(b, _rpc_error(C.UNAVAILABLE))
        assert not b.healthy and b.ejections == 1 and b.breaker.failures == 1
    finally:
        await pool.close()

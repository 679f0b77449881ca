"""Workers the router can use: one gRPC channel each, kept fresh by its Subscribe stream.

Watch lifecycle per worker: Info (model, block size, role) -> Subscribe (snapshot, then KV
events and load reports) -> on a broken stream: unhealthy, back off, reconnect. A worker is
healthy while its event stream is up (an active check: a load report every 0.5 s, silence for
`stall_timeout_s` ejects it) and its circuit breaker is closed (passive: requests that fail in
a row eject it; a gRPC health Check after a cool-down lets it back, see router/breaker.py).
A dead worker stops receiving requests within one failed read, not after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdrouter_proto import worker_pb2 as pb
from pdrouter_proto import worker_pb2_grpc as pb_grpc
from router.breaker import Breaker
from workers.tls import ChannelTls

log = logging.getLogger("pdrouter.router.pool")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
]

# NOTE: a removed worker's streams in flight finish on it (a draining worker ends them itself)
REMOVED_GRACE_S = 600.0
ROLE_NAMES = {pb.ROLE_BOTH: "both", pb.ROLE_PREFILL: "prefill", pb.ROLE_DECODE: "decode"}
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name  # what the health probe asks about


class _Incompatible(Exception):
    """A worker whose Info disagrees with the pool (e.g. block size)."""


class WorkerClient:
    def __init__(self, address: str, tls: ChannelTls | None = None) -> None:
        self.address = address
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + list(tls.options)
            self.channel = grpc.aio.secure_channel(address, tls.credentials, options=options)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.info: pb.InfoResponse | None = None
        self.worker_id = address  # NOTE: a plain attribute: read per candidate on every routing decision
        self.role = "both"
        self.healthy = False  # NOTE: a plain attribute, read per candidate: stream_up and breaker closed
        self.stream_up = False
        self.breaker = Breaker()
        self.ejections = 0
        self.load = pb.LoadReport()
        self.in_flight = 0
        self.instance_id = 0
        self._task: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None

    async def stop_watching(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def close(self, grace: float | None = None) -> None:
        """Stop watching; calls in flight get `grace` seconds (None: cancelled at once)."""
        await self.stop_watching()
        await self.channel.close(grace=grace)


class WorkerPool:
    def __init__(
        self,
        addresses: list[str],
        on_event: Callable[[WorkerClient, pb.WorkerEvent], None] | None = None,
        on_down: Callable[[WorkerClient], None] | None = None,
        tls: ChannelTls | None = None,
        breaker_threshold: int = 3,
        breaker_cooldown_s: float = 1.0,
    ):
        self.tls = tls  # NOTE: every WorkerClient of this pool dials with it (mutual TLS)
        self.breaker_threshold = breaker_threshold  # requests failed in a row that eject a worker
        self.breaker_cooldown_s = breaker_cooldown_s  # first wait before the half-open health probe
        self.workers = [self._client(a) for a in addresses]
        self.on_event = on_event
        self.on_down = on_down  # a worker went unhealthy: forget what it held (its snapshot refills)
        self.stall_timeout_s = 3.0  # no event (load reports come every 0.5 s) for this long: ejected
        self.block_size = 16  # settled by the first worker's Info; every worker must agree
        self._block_size_known = False
        self._changed = asyncio.Event()
        self._started = False
        self._removed: dict[WorkerClient, asyncio.Task] = {}  # closing once their calls end

    def _client(self, address: str) -> WorkerClient:
        w = WorkerClient(address, self.tls)
        w.breaker = Breaker(self.breaker_threshold, self.breaker_cooldown_s)
        return w

    def start(self) -> None:
        self._started = True
        for w in self.workers:
            w._task = asyncio.create_task(self._watch(w), name=f"watch-{w.address}")

    def add(self, address: str) -> WorkerClient:
        """A worker joined (discovery): watch it; it takes requests once its snapshot arrives."""
        for w in self.workers:
            if w.address == address:
                return w
        w = self._client(address)
        self.workers = [*self.workers, w]  # NOTE: a new list: routing iterates the old one safely
        if self._started:
            w._task = asyncio.create_task(self._watch(w), name=f"watch-{address}")
        log.info("worker %s joined", address)
        return w

    async def remove(self, address: str) -> None:
        """A worker left (discovery): no new requests; forget its KV entries and bookings.
        Calls already running on it go on until they end (or break and migrate); its channel
        closes after them, in the background."""
        gone = [w for w in self.workers if w.address == address]
        if not gone:
            return
        self.workers = [w for w in self.workers if w.address != address]
        for w in gone:
            await w.stop_watching()
            self._set_stream(w, False)
            task = asyncio.create_task(w.close(REMOVED_GRACE_S), name=f"close-{address}")
            self._removed[w] = task
            task.add_done_callback(lambda _, w=w: self._removed.pop(w, None))
        log.info("worker %s left", address)

    async def close(self) -> None:
        removed = list(self._removed)
        await asyncio.gather(*(w.close() for w in [*self.workers, *removed]))
        await asyncio.gather(*self._removed.values(), return_exceptions=True)

    def healthy(self, role: str | None = None) -> list[WorkerClient]:
        return [w for w in self.workers if w.healthy and (role is None or w.role in (role, "both"))]

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until at least one worker is healthy (used by tests and `serve`)."""
        async with asyncio.timeout(timeout):
            while not self.healthy():
                self._changed.clear()
                await self._changed.wait()
        return True

    def _accept(self, w: WorkerClient, info: pb.InfoResponse) -> bool:
        if not self._block_size_known:
            self.block_size, self._block_size_known = info.block_size, True
        elif info.block_size != self.block_size:
            log.error(
                "worker %s uses KV block size %d but the pool uses %d; not routing to it",
                w.address, info.block_size, self.block_size,
            )  # fmt: skip
            return False
        w.info, w.worker_id, w.role = info, info.worker_id or w.address, ROLE_NAMES.get(info.role, "both")
        return True

    def succeeded(self, w: WorkerClient) -> None:
        w.breaker.failures = 0  # NOTE: per request: the cheap part of Breaker.success
        if w.breaker.trips:
            w.breaker.success()

    def failed(self, w: WorkerClient, unreachable: bool = False) -> None:
        """A request on `w` failed in a way that is the worker's fault (not the client's, not load)."""
        if not w.breaker.failure(unreachable):
            return
        w.ejections += 1
        log.warning(
            "worker %s ejected after %d failed requests in a row; health probe in %.1f s",
            w.address, w.breaker.failures, w.breaker.cooldown_s,
        )  # fmt: skip
        w.healthy = False
        self._changed.set()
        if w not in self.workers:
            return  # NOTE: removed by discovery meanwhile: nothing to probe it back into
        if w._probe is None or w._probe.done():
            w._probe = asyncio.create_task(self._half_open(w), name=f"probe-{w.address}")

    async def _half_open(self, w: WorkerClient) -> None:
        """Wait the cool-down, then ask the worker's gRPC health service; back in when SERVING."""
        health = health_pb2_grpc.HealthStub(w.channel)
        while w.breaker.open:
            await asyncio.sleep(w.breaker.cooldown_s)  # the breaker's cool-down, not synchronisation
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=2)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                serving = False
            w.breaker.probed(serving)
        self._set_stream(w, w.stream_up)
        log.info("worker %s passed its health probe (half-open)", w.address)

    def _set_stream(self, w: WorkerClient, up: bool) -> None:
        """The event stream came up or went down; health follows it and the breaker."""
        was_up, w.stream_up = w.stream_up, up
        healthy = up and not w.breaker.open
        if w.healthy != healthy:
            log.info("worker %s is %s", w.address, "healthy" if healthy else "unhealthy")
        if was_up and not up and self.on_down is not None:
            self.on_down(w)
        w.healthy = healthy
        self._changed.set()

    async def _watch(self, w: WorkerClient) -> None:
        backoff = 0.05
        while True:
            try:
                info = await w.stub.Info(pb.InfoRequest(), timeout=5)
                if not self._accept(w, info):
                    raise _Incompatible
                stream = w.stub.Subscribe(pb.SubscribeRequest(subscriber_id="router"))
                expected = 1
                while True:
                    try:
                        async with asyncio.timeout(self.stall_timeout_s):  # NOTE: no task per event
                            event = await stream.read()
                    except TimeoutError:
                        # NOTE: load reports come every 0.5 s; silence means a stalled worker
                        # (SIGSTOP, a hung engine): eject it; reconnecting is the half-open probe
                        log.warning("worker %s silent for %.1f s; ejecting", w.address, self.stall_timeout_s)
                        stream.cancel()
                        break
                    if event is grpc.aio.EOF:
                        break
                    if event.seq != expected:
                        log.warning(
                            "worker %s event gap (%d != %d); resubscribing", w.address, event.seq, expected
                        )
                        stream.cancel()
                        break
                    expected += 1
                    kind = event.WhichOneof("kind")
                    if kind == "snapshot":
                        if event.snapshot.instance_id != w.instance_id:
                            w.breaker.success()  # a new process: its predecessor's failures are not its own
                        w.instance_id = event.snapshot.instance_id
                        w.load = event.snapshot.load
                        self._set_stream(w, True)
                        backoff = 0.05
                    elif kind == "load":
                        w.load = event.load
                    if self.on_event is not None:
                        self.on_event(w, event)
            except asyncio.CancelledError:
                raise
            except _Incompatible:
                pass
            except grpc.aio.AioRpcError as exc:
                if w.healthy:
                    log.warning("worker %s stream broke: %s", w.address, exc.code().name)
            except Exception:  # NOTE: a watcher must never die; log and retry
                log.exception("worker %s watcher failed", w.address)
            self._set_stream(w, False)
            await asyncio.sleep(backoff)  # reconnect back-off, not synchronisation
            backoff = min(backoff * 2, 2.0)

"""kvtransfer transport layer: pools, handles, shm/tcp/fake transports, backends built and chosen
through kvtransfer.registry (its unit tests are in test_kv_registry.py).

Pure tests are marked `unit`; the ones that start a peer process or bind sockets on 127.0.0.1
are `integration`. Every wait is bounded (asyncio timeouts, process wait timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from kvtransfer.errors import LayoutMismatch, TransferError, TransferRefused
from kvtransfer.fake import FakeTransport, RegistryControl
from kvtransfer.handles import HandleRegistry
from kvtransfer.host import host_id
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.registry import Setup, build
from kvtransfer.shm import ShmTransport, _run_to_end
from kvtransfer.tcp import (
    OP_CLAIM,
    OP_READ,
    REQUEST,
    RESPONSE,
    TcpTransferServer,
    TcpTransport,
    encode_request,
)
from kvtransfer.transport import HandleRef, runs
from tests.kvtransfer_peer import pattern

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
LAYOUT = KvLayout(dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)  # 32 KiB
SMOL = KvLayout(dtype="float32", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
OTHER = KvLayout(dtype="float16", num_layers=4, num_kv_heads=2, head_dim=64, block_size=32)
NUM_BLOCKS = 300
BOUND_S = 20.0


def layout_arg(layout: KvLayout) -> str:
    return f"{layout.dtype},{layout.num_layers},{layout.num_kv_heads},{layout.head_dim},{layout.block_size}"


def make_pool(
    layout: KvLayout = LAYOUT, num_blocks: int = NUM_BLOCKS, seed: int | None = None, **kw
) -> KvPool:
    pool = KvPool.create(layout, num_blocks, **kw)
    if seed is not None:
        pool.array[:] = pattern(num_blocks, layout.block_bytes, seed)
    return pool


def make_ref(handle, src: KvPool | None = None, **kw) -> HandleRef:
    fields = {
        "handle_id": handle.handle_id,
        "token": handle.token,
        "endpoint": "",
        "layout": src.layout if src is not None else LAYOUT,
        "shm_name": (src.name or "") if src is not None else "",
        "num_blocks": src.num_blocks if src is not None else NUM_BLOCKS,
        "host_id": host_id(),
    }
    return HandleRef(**{**fields, **kw})


def scattered(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.permutation(NUM_BLOCKS)[:n].tolist(), rng.permutation(NUM_BLOCKS)[:n].tolist()


def assert_copied(src: KvPool | np.ndarray, dst: KvPool, src_ids: list[int], dst_ids: list[int]) -> None:
    src_arr = src.array if isinstance(src, KvPool) else src
    assert np.array_equal(dst.array[dst_ids], src_arr[src_ids])


def our_segments() -> set[str]:
    return {p.name for p in SHM.glob("pdrouter-kv-*")} if SHM.exists() else set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every shared-memory segment a test creates is unlinked by its end."""
    before = our_segments()
    yield
    leaked = {n for n in our_segments() - before if n.startswith(f"pdrouter-kv-{os.getpid()}-")}
    assert not leaked, f"leaked shared memory: {leaked}"


# -- runs -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_runs_merges_where_both_sides_are_consecutive() -> None:
    assert runs([], []) == []
    assert runs([5], [9]) == [(5, 9, 1)]
    assert runs([0, 1, 2, 3], [10, 11, 12, 13]) == [(0, 10, 4)]
    assert runs([0, 1, 2, 3], [10, 11, 20, 21]) == [(0, 10, 2), (2, 20, 2)]
    assert runs([0, 1, 5, 6], [10, 11, 12, 13]) == [(0, 10, 2), (5, 12, 2)]
    assert runs([3, 2, 1], [0, 1, 2]) == [(3, 0, 1), (2, 1, 1), (1, 2, 1)]
    assert runs([7, 7], [1, 2]) == [(7, 1, 1), (7, 2, 1)]
    assert runs([4, 5, 9], [4, 5, 9]) == [(4, 4, 2), (9, 9, 1)]


@pytest.mark.unit
def test_runs_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="2 source ids but 1"):
        runs([1, 2], [1])


# -- pool -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_private_pool_views() -> None:
    with KvPool.create(LAYOUT, 4) as pool:
        assert pool.name is None and pool.nbytes == 4 * LAYOUT.block_bytes
        assert pool.array.shape == (4, LAYOUT.block_bytes)
        pool.block_view(2)[:] = b"\x07" * LAYOUT.block_bytes
        assert pool.array[2].min() == 7 and pool.array[[0, 1, 3]].max() == 0
        assert pool.buffer.format == "B" and not pool.buffer.readonly
    assert pool.closed
    pool.close()  # idempotent


@pytest.mark.unit
def test_shared_pool_attach_sees_owner_writes_and_only_owner_unlinks() -> None:
    owner = KvPool.create(LAYOUT, 8, shared=True)
    assert owner.name is not None and (SHM / owner.name).exists()
    assert (SHM / owner.name).stat().st_mode & 0o777 == 0o600
    peer = KvPool.attach(owner.name, LAYOUT, 8)
    owner.array[3] = 42
    assert peer.array[3].min() == 42
    peer.close()
    assert (SHM / owner.name).exists()
    owner.close()
    assert not (SHM / owner.name).exists()


@pytest.mark.unit
def test_attach_errors_are_clear() -> None:
    with pytest.raises(FileNotFoundError):
        KvPool.attach("pdrouter-kv-does-not-exist", LAYOUT, 1)
    with KvPool.create(LAYOUT, 2, shared=True) as owner, pytest.raises(ValueError, match="layout needs"):
        KvPool.attach(owner.name, LAYOUT, 3)


@pytest.mark.unit
def test_close_with_outstanding_views_does_not_raise() -> None:
    pool = KvPool.create(LAYOUT, 2, shared=True)
    view = np.frombuffer(pool.buffer, dtype=np.uint8)
    block = pool.block_view(1)
    pool.close()
    assert not (SHM / pool.name).exists()
    view[0] = 1  # NOTE: the mapping lives while views do
    block[0] = 2


@pytest.mark.integration
def test_attachers_never_touch_the_resource_tracker(tmp_path: Path) -> None:
    """An attacher exiting must not unlink the owner's segment, and nobody warns about leaks."""
    owner_script = (
        "import sys; from kvtransfer.pool import KvPool; from tests.test_kvtransfer import LAYOUT\n"
        "p = KvPool.create(LAYOUT, 2, shared=True); print(p.name, flush=True); sys.stdin.readline()\n"
        "q = KvPool.attach(p.name, LAYOUT, 2); q.close(); p.close(); print('closed', flush=True)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_script],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        name = owner.stdout.readline().strip()
        attacher = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from kvtransfer.pool import KvPool; from tests.test_kvtransfer import LAYOUT\n"
                "q = KvPool.attach(sys.argv[1], LAYOUT, 2); q.array[1] = 9; q.close()\n",
                name,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BOUND_S,
        )
        assert attacher.returncode == 0, attacher.stderr
        assert attacher.stderr == ""
        assert (SHM / name).exists(), "the attacher's exit unlinked the owner's segment"
        out, err = owner.communicate("go\n", timeout=BOUND_S)
        assert out.strip() == "closed" and owner.returncode == 0
        assert "resource_tracker" not in err and "Traceback" not in err, err
        assert not (SHM / name).exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            owner.kill()


# -- handles --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_registry() -> tuple[HandleRegistry, list[str], Clock]:
    unpinned: list[str] = []
    clock = Clock()
    return HandleRegistry(on_unpin=lambda h: unpinned.append(h.handle_id), clock=clock), unpinned, clock


@pytest.mark.unit
def test_publish_and_claim() -> None:
    reg, unpinned, clock = make_registry()
    h = reg.publish("r1", [3, 4, 5], 40, ttl_s=30.0)
    assert isinstance(h.token, bytes) and len(h.token) == 16  # 128 bits, raw
    assert h.block_ids == [3, 4, 5] and h.num_tokens == 40 and h.expires_at == 1030.0
    assert reg.num_pinned == 1
    clock.now = 1020.0
    claimed = reg.claim("r1", h.token)
    assert claimed.block_ids == [3, 4, 5] and claimed.expires_at == 1050.0  # the pull gets a full TTL
    assert reg.is_live(claimed) and unpinned == []
    with pytest.raises(ValueError, match="already published"):
        reg.publish("r1", [1], 1)
    tokens = {h.token, *(reg.publish(f"r{i}", [i], 16).token for i in range(2, 10))}
    assert len(tokens) == 9  # every handle mints its own token


@pytest.mark.unit
def test_claim_refusals_say_why() -> None:
    reg, unpinned, clock = make_registry()
    h = reg.publish("r1", [1], 16, ttl_s=10.0)
    with pytest.raises(TransferRefused, match="unknown handle 'nope'"):
        reg.claim("nope", h.token)
    with pytest.raises(TransferRefused, match="wrong token") as info:
        reg.claim("r1", bytes(16))
    assert "wrong token" in info.value.reason
    with pytest.raises(TransferRefused, match="wrong token"):
        reg.claim("r1", h.token.hex().encode()[:16])  # the hex text of the token is not the token
    reg.claim("r1", h.token)
    with pytest.raises(TransferRefused, match="reused"):
        reg.claim("r1", h.token)
    reg.release("r1")
    with pytest.raises(TransferRefused, match="reused"):
        reg.claim("r1", h.token)
    h2 = reg.publish("r2", [2], 16, ttl_s=10.0)
    clock.now += 10.0
    with pytest.raises(TransferRefused, match="expired"):
        reg.claim("r2", h2.token)
    assert unpinned == ["r1", "r2"] and reg.num_pinned == 0  # an expired claim unpins at once
    assert reg.num_expired == 1
    with pytest.raises(TransferRefused, match="expired"):
        reg.claim("r2", h2.token)
    h3 = reg.publish("r3", [3], 16)
    reg.release("r3")
    with pytest.raises(TransferRefused, match="released"):
        reg.claim("r3", h3.token)


@pytest.mark.unit
def test_release_is_idempotent_and_unpins_once() -> None:
    reg, unpinned, _ = make_registry()
    h = reg.publish("r1", [1, 2], 32)
    assert reg.num_pinned_blocks == 2
    assert reg.release("r1", token=b"\xff" * 16) is False  # a wrong token releases nothing
    assert reg.num_pinned == 1 and unpinned == []
    assert reg.release("r1", token=h.token) is True
    assert reg.release("r1") is False
    assert reg.release("never") is False
    assert unpinned == ["r1"] and reg.num_pinned == 0 and reg.num_pinned_blocks == 0
    assert not reg.is_live(h)


@pytest.mark.unit
def test_expire_sweeps_only_expired_and_unpins_once() -> None:
    reg, unpinned, clock = make_registry()
    reg.publish("short", [1], 16, ttl_s=5.0)
    reg.publish("long", [2], 16, ttl_s=60.0)
    claimed = reg.publish("claimed", [3], 16, ttl_s=5.0)
    clock.now += 4.0
    reg.claim("claimed", claimed.token)  # restarts its TTL: expires at now + 5
    assert [h.handle_id for h in reg.expire(clock.now + 1.0)] == ["short"]
    assert reg.expire(clock.now + 1.0) == []
    assert [h.handle_id for h in reg.expire(clock.now + 5.0)] == ["claimed"]
    reg.release("short")
    assert unpinned == ["short", "claimed"] and reg.num_pinned == 1 and reg.num_expired == 2
    reg.close()
    assert unpinned == ["short", "claimed", "long"] and reg.num_pinned == 0


@pytest.mark.unit
def test_a_failing_unpin_callback_does_not_stop_the_sweep() -> None:
    seen = []

    def on_unpin(h) -> None:
        seen.append(h.handle_id)
        raise RuntimeError("engine gone")

    reg = HandleRegistry(on_unpin=on_unpin, clock=Clock())
    for i in range(3):
        reg.publish(f"r{i}", [i], 16, ttl_s=1.0)
    assert len(reg.expire(2000.0)) == 3 and seen == ["r0", "r1", "r2"]


@pytest.mark.unit
def test_concurrent_claims_exactly_one_wins() -> None:
    reg, _, _ = make_registry()
    h = reg.publish("r1", [1], 16)
    barrier = threading.Barrier(16)
    results: list[str] = []

    def claim() -> None:
        barrier.wait(timeout=BOUND_S)
        try:
            reg.claim("r1", h.token)
            results.append("ok")
        except TransferRefused as exc:
            results.append(exc.reason)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=BOUND_S)
    assert results.count("ok") == 1
    assert all("reused" in r for r in results if r != "ok") and len(results) == 16


@pytest.mark.unit
def test_concurrent_release_and_expiry_unpin_each_handle_once() -> None:
    reg, unpinned, clock = make_registry()
    n = 2000
    for i in range(n):
        reg.publish(f"r{i}", [i], 16, ttl_s=1.0 if i % 2 else 100.0)
    barrier = threading.Barrier(4)

    def releaser(offset: int) -> None:
        barrier.wait(timeout=BOUND_S)
        for i in range(offset, n, 2):
            reg.release(f"r{i}")

    def sweeper() -> None:
        barrier.wait(timeout=BOUND_S)
        for _ in range(50):
            reg.expire(clock.now + 10.0)

    threads = [threading.Thread(target=f, args=a) for f, a in ((releaser, (0,)), (releaser, (1,)))]
    threads += [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=BOUND_S)
    assert sorted(unpinned) == sorted(f"r{i}" for i in range(n)) and reg.num_pinned == 0


# -- fake transport --------------------------------------------------------------------------


@pytest.mark.unit
async def test_fake_transport_copies_fails_and_aborts() -> None:
    with make_pool(seed=1) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        h = reg.publish("r1", [], 0)
        fake = FakeTransport(src, dst)
        await fake.pull(make_ref(h), [0, 1, 7], [5, 6, 2])
        assert_copied(src, dst, [0, 1, 7], [5, 6, 2])
        assert fake.calls == [("r1", [0, 1, 7], [5, 6, 2])]
        assert fake.stats.num_pulls == 1 and fake.stats.num_bytes == 3 * LAYOUT.block_bytes
        fake.fail_with = TransferRefused("nope")
        with pytest.raises(TransferRefused):
            await fake.pull(make_ref(h), [0], [0])
        fake.fail_with, fake.gate = None, asyncio.Event()
        task = asyncio.ensure_future(fake.pull(make_ref(h), [0], [0]))
        await asyncio.wait_for(asyncio.shield(_until(lambda: len(fake.calls) == 3)), BOUND_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.stats.num_failures == 1 and fake.stats.num_aborts == 1
        with pytest.raises(LayoutMismatch):
            await fake.pull(make_ref(h, layout=OTHER), [0], [0])
        with pytest.raises(TransferError, match="destination block ids out of range"):
            await fake.pull(make_ref(h), [0], [NUM_BLOCKS])


@pytest.mark.unit
async def test_fake_transport_claims_and_releases_through_its_control() -> None:
    with make_pool(seed=8) as src, make_pool() as dst:
        reg, unpinned, _ = make_registry()
        h = reg.publish("r1", [2, 3], 32)
        fake = FakeTransport(src, dst, RegistryControl(reg))
        await fake.pull(make_ref(h), [2], [0])
        await fake.pull(make_ref(h), [3], [1])  # claimed once: later pulls of the handle go on
        assert_copied(src, dst, [2, 3], [0, 1])
        with pytest.raises(TransferRefused, match="reused"):  # another puller: the token is spent
            await FakeTransport(src, dst, RegistryControl(reg)).pull(make_ref(h), [2], [0])
        h2 = reg.publish("r2", [4], 16)
        with pytest.raises(TransferRefused, match="wrong token"):
            await fake.pull(make_ref(h2, token=bytes(16)), [4], [4])
        assert not dst.array[4].any() and fake.stats.num_failures == 1 and fake.stats.num_pulls == 2
        assert await fake.release(make_ref(h, token=bytes(16))) is False
        assert await fake.release(make_ref(h)) is True and await fake.release(make_ref(h)) is False
        assert unpinned == ["r1"] and reg.num_pinned == 1


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0)


# -- shm ------------------------------------------------------------------------------------


class CountingControl(RegistryControl):
    """RegistryControl that records every claim it is asked for."""

    def __init__(self, registry: HandleRegistry) -> None:
        super().__init__(registry)
        self.claims: list[str] = []

    async def claim(self, handle: HandleRef) -> None:
        self.claims.append(handle.handle_id)
        await super().claim(handle)


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 16, 256])
async def test_shm_pull_in_process(n: int) -> None:
    with make_pool(seed=n, shared=True) as src, make_pool() as dst:
        reg, unpinned, _ = make_registry()
        src_ids, dst_ids = scattered(n, n)
        h = reg.publish("r1", src_ids, n * 16)
        control = CountingControl(reg)
        shm = ShmTransport(dst, control, thread_min_bytes=64 * LAYOUT.block_bytes)
        assert shm.reach(make_ref(h, src)) is None
        await asyncio.wait_for(shm.pull(make_ref(h, src), src_ids, dst_ids), BOUND_S)
        assert_copied(src, dst, src_ids, dst_ids)
        contiguous = list(range(n))
        await asyncio.wait_for(shm.pull(make_ref(h, src), contiguous, contiguous), BOUND_S)
        assert_copied(src, dst, contiguous, contiguous)
        assert control.claims == ["r1"]  # claimed once
        assert await shm.release(make_ref(h, src)) is True and unpinned == ["r1"]
        assert await shm.release(make_ref(h, src)) is False
        await shm.close()


@pytest.mark.unit
async def test_shm_refusal_layout_and_missing_pool() -> None:
    with make_pool(seed=3, shared=True) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        h = reg.publish("r1", [0], 16)
        control = CountingControl(reg)
        shm = ShmTransport(dst, control)
        with pytest.raises(TransferRefused, match="wrong token"):
            await shm.pull(make_ref(h, src, token=bytes(16)), [0], [0])
        with pytest.raises(LayoutMismatch) as info:
            await shm.pull(make_ref(h, src, layout=OTHER), [0], [0])
        assert LAYOUT.describe() in str(info.value) and OTHER.describe() in str(info.value)
        with pytest.raises(TransferError, match="compat"):
            await ShmTransport(dst, RegistryControl(reg), compat_hash="aaaa").pull(
                make_ref(h, src, compat_hash="bbbb"), [0], [0]
            )
        with pytest.raises(TransferError, match="source block ids out of range"):
            await shm.pull(make_ref(h, src), [NUM_BLOCKS], [0])
        await shm.pull(make_ref(h, src), [0], [0])
        assert control.claims == ["r1", "r1"]  # the refused claim, then the good one
        reg.release("r1")
        control.claims.clear()
        again = reg.publish("r1", [1], 16)  # the same request id, published anew: a new token
        await shm.pull(make_ref(again, src), [1], [1])
        await shm.pull(make_ref(again, src), [1], [2])
        assert control.claims == ["r1"]
        name = src.name
    with pytest.raises(TransferError, match="is gone"):
        await shm.pull(make_ref(h, shm_name=name, num_blocks=NUM_BLOCKS), [0], [0])
    await shm.close()


@pytest.mark.unit
async def test_shm_claim_failure_is_a_transfer_error() -> None:
    class Broken:
        async def claim(self, ref: HandleRef) -> None:
            raise ConnectionError("control channel unavailable")

        async def release(self, ref: HandleRef) -> bool:
            raise AssertionError("nothing was claimed")

    with make_pool(seed=3, shared=True) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        h = reg.publish("r1", [0], 16)
        shm = ShmTransport(dst, Broken())
        with pytest.raises(TransferError, match="control channel unavailable"):
            await shm.pull(make_ref(h, src), [0], [0])
        assert not dst.array.any() and shm.stats.num_failures == 1
        await shm.close()


@pytest.mark.unit
async def test_threaded_copy_stops_before_the_pull_ends() -> None:
    """Cancelling a pull that copies in a thread returns only once the thread has stopped."""
    started, stopped = threading.Event(), threading.Event()

    def copy(abort: threading.Event) -> None:
        started.set()
        abort.wait(timeout=BOUND_S)
        stopped.set()

    task = asyncio.ensure_future(_run_to_end(copy))
    await asyncio.wait_for(asyncio.to_thread(started.wait, BOUND_S), BOUND_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND_S)
    assert stopped.is_set()


class Peer:
    """tests/kvtransfer_peer.py in a subprocess: a prefill side with its own pool and server."""

    def __init__(self, proc: asyncio.subprocess.Process, info: dict) -> None:
        self.proc = proc
        self.info = info
        self.shm_name: str = info["shm_name"]
        self.endpoint: str = info["endpoint"]
        self.host_id: str = info["host_id"]

    @classmethod
    async def start(cls, layout: KvLayout = LAYOUT, blocks: int = NUM_BLOCKS, seed: int = 0) -> Peer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.kvtransfer_peer",
            "--blocks",
            str(blocks),
            "--seed",
            str(seed),
            "--layout",
            layout_arg(layout),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        line = await asyncio.wait_for(proc.stdout.readline(), BOUND_S)
        return cls(proc, json.loads(line))

    async def ask(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), BOUND_S))

    # NOTE: claim and release make the peer a kvtransfer.transport.Control (over its stdin)
    async def claim(self, ref: HandleRef) -> None:
        answer = await self.ask(op="claim", handle_id=ref.handle_id, token=ref.token.hex())
        if not answer["ok"]:
            raise TransferRefused(answer["reason"])

    async def release(self, ref: HandleRef) -> bool:
        return (await self.ask(op="release", handle_id=ref.handle_id, token=ref.token.hex()))["released"]

    def ref(self, handle: dict, layout: KvLayout = LAYOUT, **kw) -> HandleRef:
        fields = {
            "handle_id": handle["handle_id"],
            "token": bytes.fromhex(handle["token"]),
            "endpoint": self.endpoint,
            "layout": layout,
            "shm_name": self.shm_name,
            "num_blocks": self.info["num_blocks"],
            "host_id": self.host_id,
            "source_worker": "peer",
        }
        return HandleRef(**{**fields, **kw})

    async def quit(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(b'{"op": "quit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), BOUND_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def peer(**kw) -> AsyncIterator[Peer]:
    p = await Peer.start(**kw)
    try:
        yield p
    finally:
        await p.quit()
        if p.proc.returncode is None or p.proc.returncode < 0:
            # NOTE: a killed peer cannot unlink its own segment; clean up after it
            with contextlib.suppress(FileNotFoundError):
                (SHM / p.shm_name).unlink()


@pytest.mark.integration
async def test_shm_pull_from_another_process() -> None:
    async with peer(seed=5) as p:
        expected = pattern(NUM_BLOCKS, LAYOUT.block_bytes, 5)
        with make_pool() as dst:
            src_ids, dst_ids = scattered(64, 9)
            h = await p.ask(op="publish", handle_id="req-1", ids=src_ids)
            assert p.host_id == host_id()  # the peer's host id as it computed it: same host
            shm = ShmTransport(dst, p)
            assert shm.reach(p.ref(h)) is None
            await asyncio.wait_for(shm.pull(p.ref(h), src_ids, dst_ids), BOUND_S)
            assert_copied(expected, dst, src_ids, dst_ids)
            other = ShmTransport(dst, p)
            with pytest.raises(TransferRefused, match="reused"):  # another transport, same token
                await other.pull(p.ref(h), src_ids, dst_ids)
            assert await shm.release(p.ref(h, token=bytes(16))) is False  # a wrong token releases nothing
            assert await p.ask(op="pinned") == {"pinned": 1, "unpinned": []}
            assert await shm.release(p.ref(h)) is True
            assert await p.ask(op="pinned") == {"pinned": 0, "unpinned": ["req-1"]}
            # NOTE: the deployed path: claim and release through the peer's transfer server
            tcp = TcpTransport(dst)
            h = await p.ask(op="publish", handle_id="req-2", ids=[7, 8, 9])
            via_tcp = ShmTransport(dst, tcp)
            await asyncio.wait_for(via_tcp.pull(p.ref(h), [7, 8, 9], [0, 1, 2]), BOUND_S)
            assert_copied(expected, dst, [7, 8, 9], [0, 1, 2])
            assert await via_tcp.release(p.ref(h)) is True
            assert await p.ask(op="pinned") == {"pinned": 0, "unpinned": ["req-1", "req-2"]}
            await asyncio.gather(shm.close(), other.close(), via_tcp.close(), tcp.close())
        name = p.shm_name
    assert p.proc.returncode == 0
    assert not (SHM / name).exists(), "the owner's segment outlived it"


@pytest.mark.integration
async def test_registry_transports_pull_from_another_process() -> None:
    """What a decode worker builds (kvtransfer.registry) pulls from a real prefill peer: shm for
    a handle from this host, tcp for one from another host; both claim and release through the
    peer's transfer server."""
    async with peer(seed=12) as p:
        expected = pattern(NUM_BLOCKS, LAYOUT.block_bytes, 12)
        with make_pool() as dst:
            transports = build(Setup(dst), names=("shm", "tcp"))
            try:
                assert set(transports.by_name) == {"shm", "tcp"}
                h = await p.ask(op="publish", handle_id="same-host", ids=[1, 2, 3])
                t, note = transports.choose(p.ref(h))
                assert (t.backend, note) == ("shm", "")
                await asyncio.wait_for(t.pull(p.ref(h), [1, 2, 3], [10, 11, 12]), BOUND_S)
                assert await t.release(p.ref(h)) is True
                h = await p.ask(op="publish", handle_id="other-host", ids=[4, 5])
                far = p.ref(h, host_id="elsewhere/boot")  # same endpoint, but no shared memory
                t, note = transports.choose(far)
                assert (t.backend, note) == ("tcp", "")
                await asyncio.wait_for(t.pull(far, [4, 5], [20, 21]), BOUND_S)
                assert await t.release(far) is True
                assert_copied(expected, dst, [1, 2, 3, 4, 5], [10, 11, 12, 20, 21])
                assert await p.ask(op="pinned") == {"pinned": 0, "unpinned": ["same-host", "other-host"]}
            finally:
                await transports.close()


# -- tcp ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_server(src: KvPool, reg: HandleRegistry) -> AsyncIterator[TcpTransferServer]:
    server = TcpTransferServer(src, reg, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def tcp_ref(server_or_endpoint, handle, layout: KvLayout = LAYOUT, **kw) -> HandleRef:
    endpoint = getattr(server_or_endpoint, "endpoint", server_or_endpoint)
    fields = {"handle_id": handle.handle_id, "token": handle.token, "endpoint": endpoint}
    return HandleRef(**{**fields, "layout": layout, **kw})


@pytest.mark.integration
@pytest.mark.parametrize("n", [1, 16, 256])
async def test_tcp_pull_byte_exact(n: int) -> None:
    with make_pool(seed=n) as src, make_pool() as dst:
        reg, unpinned, _ = make_registry()
        async with tcp_server(src, reg) as server:
            tcp = TcpTransport(dst)
            for contiguous in (False, True):
                src_ids, dst_ids = (list(range(n)), list(range(7, 7 + n))) if contiguous else scattered(n, n)
                h = reg.publish(f"r{contiguous}", src_ids, n * 16)
                await asyncio.wait_for(tcp.pull(tcp_ref(server, h), src_ids, dst_ids), BOUND_S)
                assert_copied(src, dst, src_ids, dst_ids)
                reg.release(h.handle_id)
            assert server.num_connections == 1  # the connection was reused across handles
            assert tcp._idle[server.endpoint][0].sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert tcp.stats.num_pulls == 2 and tcp.stats.num_bytes == 2 * n * LAYOUT.block_bytes
            await tcp.close()
        assert unpinned == ["rFalse", "rTrue"]


@pytest.mark.integration
async def test_tcp_same_connection_may_pull_a_claimed_handle_again() -> None:
    with make_pool(seed=2) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        async with tcp_server(src, reg) as server:
            tcp = TcpTransport(dst)
            h = reg.publish("r1", list(range(10)), 160)
            await tcp.pull(tcp_ref(server, h), [0, 1, 2], [0, 1, 2])
            await tcp.pull(tcp_ref(server, h), [5, 9], [100, 200])  # same connection: no new claim
            assert_copied(src, dst, [0, 1, 2, 5, 9], [0, 1, 2, 100, 200])
            other = TcpTransport(dst)
            with pytest.raises(TransferRefused, match="reused"):  # another connection: the token is spent
                await other.pull(tcp_ref(server, h), [0], [0])
            await other.close()
            with pytest.raises(TransferRefused, match="outside handle"):
                await tcp.pull(tcp_ref(server, h), [11], [11])
            reg.release("r1")
            with pytest.raises(TransferRefused, match="reused"):
                await tcp.pull(tcp_ref(server, h), [0], [0])
            await tcp.close()


@pytest.mark.integration
async def test_tcp_claim_and_release_control_calls() -> None:
    with make_pool(seed=6, shared=True) as src, make_pool() as dst:
        reg, unpinned, _ = make_registry()
        async with tcp_server(src, reg) as server:
            tcp = TcpTransport(dst)
            shm = ShmTransport(dst, tcp)
            h = reg.publish("r1", [4, 5], 32)
            ref = tcp_ref(server, h, shm_name=src.name, num_blocks=NUM_BLOCKS, host_id=host_id())
            await shm.pull(ref, [4, 5], [10, 11])
            assert_copied(src, dst, [4, 5], [10, 11])
            with pytest.raises(TransferRefused, match="reused"):
                await tcp.claim(ref)
            assert await tcp.release(tcp_ref(server, h, token=bytes(16))) is False  # wrong token
            assert reg.num_pinned == 1
            assert await tcp.release(ref) is True
            assert await tcp.release(ref) is False
            assert unpinned == ["r1"]
            other = TcpTransport(dst)
            with pytest.raises(TransferRefused, match="reused"):
                await other.claim(ref)
            await other.close()
            h2 = reg.publish("r2", [1], 16)
            with make_pool(OTHER, 2) as other_dst:
                other = TcpTransport(other_dst)
                with pytest.raises(LayoutMismatch, match="block_bytes"):
                    await other.claim(tcp_ref(server, h2))
                await other.close()
            assert server.num_connections == 3
            await asyncio.gather(shm.close(), tcp.close())


@pytest.mark.integration
async def test_tcp_refusals_name_the_reason() -> None:
    with make_pool(seed=2) as src, make_pool() as dst:
        reg, _, clock = make_registry()
        async with tcp_server(src, reg) as server:
            tcp = TcpTransport(dst)
            h = reg.publish("r1", [0, 1], 32, ttl_s=5.0)
            for token, why in (
                (bytes(16), "wrong token"),
                (b"zz", "malformed token"),
                (h.token.hex().encode(), "malformed token"),
            ):
                with pytest.raises(TransferRefused, match=why) as info:
                    await tcp.pull(tcp_ref(server, h, token=token), [0], [0])
                assert why in info.value.reason
            with pytest.raises(TransferRefused, match="unknown handle"):
                await tcp.pull(tcp_ref(server, h, handle_id="r2"), [0], [0])
            clock.now += 5.0
            with pytest.raises(TransferRefused, match="expired"):
                await tcp.pull(tcp_ref(server, h), [0], [0])
            assert server.num_connections == 1  # refusals leave the connection usable
            assert not dst.array.any()
            await tcp.close()


@pytest.mark.integration
async def test_tcp_layout_mismatch_names_both_layouts() -> None:
    with make_pool(seed=2) as src, make_pool(OTHER, 4) as dst:
        reg, _, _ = make_registry()
        async with tcp_server(src, reg) as server:
            h = reg.publish("r1", [0], 16)
            tcp = TcpTransport(dst)
            with pytest.raises(LayoutMismatch) as info:
                await tcp.pull(tcp_ref(server, h, layout=LAYOUT), [0], [0])
            assert OTHER.describe() in str(info.value) and LAYOUT.describe() in str(info.value)
            # NOTE: a handle that lies about its layout is still caught by the server's block size
            with pytest.raises(LayoutMismatch, match=f"block_bytes={LAYOUT.block_bytes}"):
                await tcp.pull(tcp_ref(server, h, layout=OTHER), [0], [0])
            await tcp.close()


@pytest.mark.unit
def test_encode_request_carries_the_raw_token() -> None:
    token = bytes(range(16))
    request = encode_request("r1", token, [3, 4])
    assert request == REQUEST.pack(b"PDKV", 1, OP_READ, 2, 2, token) + b"r1" + struct.pack("<2I", 3, 4)
    claim = encode_request("r1", token, (), OP_CLAIM)
    assert (
        REQUEST.unpack(claim[: REQUEST.size])[2:] == (OP_CLAIM, 2, 0, token)
        and claim[REQUEST.size :] == b"r1"
    )
    for bad in (token.hex().encode(), token[:15], b""):  # only the 16 raw bytes are a token
        with pytest.raises(TransferRefused, match="malformed token"):
            encode_request("r1", bad, [0])


@pytest.mark.integration
async def test_tcp_server_listens_on_the_given_host_only() -> None:
    with make_pool() as src:
        async with tcp_server(src, HandleRegistry()) as server:
            assert server._listener.getsockname() == ("127.0.0.1", server.port)
            socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S).close()
            with pytest.raises(ConnectionRefusedError), socket.socket() as s:
                s.settimeout(BOUND_S)
                s.connect(("127.0.0.2", server.port))  # another loopback address of this host


@pytest.mark.integration
async def test_tcp_bad_request_is_refused_and_closed() -> None:
    with make_pool() as src:
        async with tcp_server(src, HandleRegistry()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            status, length = RESPONSE.unpack(
                await asyncio.wait_for(reader.readexactly(RESPONSE.size), BOUND_S)
            )
            assert status == 2 and b"bad request" in await reader.readexactly(length)
            assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
            writer.close()


async def _fake_server(behaviour: str) -> tuple[asyncio.Server, str, asyncio.Event, asyncio.Event]:
    """A server that answers OK, sends half of the blocks, then misbehaves: 'close' or 'stall'.
    Returns (server, endpoint, `done` to end a stall, `sent`: set once the half is out)."""
    done, sent = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        writer.write(RESPONSE.pack(0, LAYOUT.block_bytes) + b"\x01" * (LAYOUT.block_bytes * 3 // 2))
        await writer.drain()
        sent.set()
        if behaviour == "stall":
            await done.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", done, sent


@pytest.mark.integration
@pytest.mark.parametrize("behaviour", ["close", "stall"])
async def test_tcp_connection_lost_mid_pull_is_a_transfer_error(behaviour: str) -> None:
    server, endpoint, done, _ = await _fake_server(behaviour)
    with make_pool() as dst:
        reg, _, _ = make_registry()
        h = reg.publish("r1", [0, 1, 2], 48)
        tcp = TcpTransport(dst, timeout_s=0.5)
        try:
            with pytest.raises(TransferError, match=r"closed after|timed out"):
                await asyncio.wait_for(tcp.pull(tcp_ref(endpoint, h), [0, 1, 2], [0, 1, 2]), BOUND_S)
            assert tcp.stats.num_failures == 1 and not tcp._idle.get(endpoint)
        finally:
            done.set()
            server.close()
            await tcp.close()


@pytest.mark.integration
async def test_tcp_cancelled_pull_aborts_and_drops_the_connection() -> None:
    server, endpoint, done, sent = await _fake_server("stall")
    with make_pool() as dst:
        reg, _, _ = make_registry()
        h = reg.publish("r1", [0, 1, 2], 48)
        tcp = TcpTransport(dst)
        try:
            task = asyncio.ensure_future(tcp.pull(tcp_ref(endpoint, h), [0, 1, 2], [0, 1, 2]))
            await asyncio.wait_for(sent.wait(), BOUND_S)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, BOUND_S)
            assert tcp.stats.num_aborts == 1 and not tcp._idle.get(endpoint) and not tcp._busy
        finally:
            done.set()
            server.close()
            await tcp.close()


@pytest.mark.integration
async def test_tcp_server_process_killed_or_stopped() -> None:
    """A pooled connection to a killed server fails fast; a stopped (hung) server times out."""
    with make_pool() as dst:
        async with peer(seed=7) as p:
            expected = pattern(NUM_BLOCKS, LAYOUT.block_bytes, 7)
            tcp = TcpTransport(dst, timeout_s=0.5)
            h = await p.ask(op="publish", handle_id="warm", ids=[0, 1])
            await tcp.pull(p.ref(h), [0, 1], [0, 1])
            assert_copied(expected, dst, [0, 1], [0, 1])
            h = await p.ask(op="publish", handle_id="r2", ids=list(range(256)))
            p.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(TransferError, match="timed out"):
                    await asyncio.wait_for(tcp.pull(p.ref(h), list(range(256)), list(range(256))), BOUND_S)
            finally:
                p.proc.kill()
                p.proc.send_signal(signal.SIGCONT)
                await asyncio.wait_for(p.proc.wait(), BOUND_S)
            with pytest.raises(TransferError):
                await asyncio.wait_for(tcp.pull(p.ref(h), [0], [0]), BOUND_S)
            await tcp.close()


@pytest.mark.integration
async def test_tcp_many_concurrent_pulls() -> None:
    with make_pool(seed=4) as src, make_pool(num_blocks=NUM_BLOCKS * 4) as dst:
        reg, _, _ = make_registry()
        async with tcp_server(src, reg) as server:
            tcp = TcpTransport(dst)
            jobs = []
            for i in range(16):
                src_ids, _ = scattered(64, i)
                dst_ids = list(range(i * 64, i * 64 + 64))
                h = reg.publish(f"r{i}", src_ids, 64 * 16)
                jobs.append((h, src_ids, dst_ids))
            await asyncio.wait_for(
                asyncio.gather(*(tcp.pull(tcp_ref(server, h), s, d) for h, s, d in jobs)), BOUND_S
            )
            for _, s, d in jobs:
                assert_copied(src, dst, s, d)
            assert len(tcp._idle[server.endpoint]) <= tcp.max_idle_per_endpoint
            await tcp.close()


@pytest.mark.integration
def test_tcp_pull_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        with make_pool(SMOL, 32, seed=11) as src, make_pool(SMOL, 32) as dst:
            reg = HandleRegistry()
            async with tcp_server(src, reg) as server:
                src_ids, dst_ids = [3, 4, 5, 9, 0, 1], [0, 1, 2, 30, 31, 7]
                h = reg.publish("r1", src_ids, 96)
                tcp = TcpTransport(dst)
                await asyncio.wait_for(tcp.pull(tcp_ref(server, h, layout=SMOL), src_ids, dst_ids), BOUND_S)
                assert_copied(src, dst, src_ids, dst_ids)
                await tcp.close()

    uvloop.run(main())


# -- host id --------------------------------------------------------------------------------
# (which backend reaches which handle: test_kv_registry.py)


@pytest.mark.unit
def test_host_id_is_hostname_and_boot_id() -> None:
    me = host_id()
    assert me.startswith(socket.gethostname() + "/") and me == host_id()
    boot = Path("/proc/sys/kernel/random/boot_id")
    if boot.exists():
        assert me == f"{socket.gethostname()}/{boot.read_text().strip()}"

"""KV transfer throughput: every backend's pull vs. its ceiling, measured in the same run.

    python -m bench.kvtransfer [--quick] [--loop uvloop|asyncio] [--max-blocks N] [--device cpu|cuda]

CPU (default). Layout: the default model's (SmolLM2-135M: 30 layers, 3 KV heads, head dim 64,
block size 16, float32 -> 737,280 B per block). Pulls of 1, 16, 256 and 4096 blocks (4096 blocks
is ~3 GB per pool; capped by available memory and /dev/shm space, see `max_blocks`), each with
contiguous ids (one run: one copy) and scattered ids (random source and destination blocks: one
copy per block).

- shm: `ShmTransport.pull` from a shared pool (a fresh handle per pull, claimed in-process: a real
  worker adds one round trip to the prefill worker's transfer listener for the claim) vs. the
  ceiling, one memoryview memcpy of the same bytes between the same two mappings.
- tcp: `TcpTransport.pull` from a `TcpTransferServer` in another process over 127.0.0.1 (fresh
  handle per pull, pooled connection) vs. the ceiling, a raw stream of the same byte count
  between two plain blocking sockets in two processes (one request round trip, then `sendall`
  from the server's pool / `recv_into` the destination pool, with the transport's syscall sizes:
  sends of 1 MiB, receives of 256 KiB, which were the fastest plain-socket sizes we measured).
- nixl: `NixlTransport.pull` (NIXL's UCX backend) from the pool of that same server process,
  which registered it with its own NIXL agent and sent its `NixlSource` back as msgpack (plain
  fields, as the workers put them on a KvHandle). Handles are published in the server's registry
  and claimed through its transfer listener (`TcpTransport` as the control channel) before the
  clock starts, so the figure is the data path (a real worker adds that round trip, ~0.1 ms on
  loopback). Ceiling: a memoryview memcpy of the same bytes between two mappings in this process
  (the shm ceiling). Skipped, saying why, when NIXL is not installed.

CUDA (`--device cuda`, a CUDA machine): pools are `DevicePool`s (the engine's pool tensor on the
GPU, bf16 SmolLM2 layout: 368,640 B per block), the prefill pool in a second process on the same
GPU (spawned). Rows: cuda_ipc (`CudaIpcTransport`), nixl_vram (`NixlTransport` over VRAM) and
staged (`StagedTransport`: device -> pinned host -> tcp -> pinned host -> device), each against
the ceiling d2d, a torch device-to-device copy of the same bytes in this process
(`dst.copy_(src)` + `torch.cuda.synchronize()`). One-sided pulls are claimed before the clock
starts, as above; staged claims with its first read, as tcp does.

TTFT share: the prefill of a 2,000-token prompt on the default model (our engine, in-process, as
a prefill worker runs it: chunked by the worker's default 512-token step budget; on the GPU with
`--device cuda`) next to the pull of its 125 blocks over each backend: transfer time / TTFT.

Every transfer is timed in turns with its ceiling (one untimed warm-up each), so drift hits both
alike. GB/s = 1e9 bytes per second, median over the repetitions. Pools are touched before timing
(an engine's pool is allocated and zeroed at start-up, so page faults are not part of a pull).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.common import headline, save, table
from kvtransfer.fake import RegistryControl
from kvtransfer.handles import HandleRegistry
from kvtransfer.host import host_id
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.shm import ShmTransport
from kvtransfer.tcp import RECV_CHUNK, SEND_CHUNK, TcpTransferServer, TcpTransport
from kvtransfer.transport import CudaIpcSource, HandleRef, NixlSource

LAYOUT = KvLayout(dtype="float32", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
BB = LAYOUT.block_bytes
CUDA_LAYOUT = KvLayout(dtype="bfloat16", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
COUNTS = (1, 16, 256, 4096)
KINDS = ("contiguous", "scattered")
SOURCES = {"nixl": NixlSource, "cuda_ipc": CudaIpcSource}  # offers the server sends as msgpack
_LEN = struct.Struct("<Q")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def max_blocks(pools: int = 2) -> int:
    """Blocks per pool such that `pools` pools fit in half the available memory and in /dev/shm."""
    avail = available_bytes()
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else avail
    return int(min(avail * 0.5 / pools, shm_free * 0.8) // BB)


def fill(pool: KvPool) -> None:
    """A different byte per block, written everywhere (touches every page)."""
    pool.array[:] = (np.arange(pool.num_blocks, dtype=np.uint32) % 251).astype(np.uint8)[:, None]


def id_sets(n: int, num_blocks: int, scattered: bool, seed: int) -> tuple[list[int], list[int]]:
    if not scattered:
        return list(range(n)), list(range(n))
    rng = np.random.default_rng(seed)
    return rng.permutation(num_blocks)[:n].tolist(), rng.permutation(num_blocks)[:n].tolist()


def _byte(dst: Any, block: int, pos: int) -> int:
    if hasattr(dst, "array"):  # KvPool (host memory)
        return int(dst.array[block, pos])
    return int(dst.blocks[block, pos].item())  # DevicePool: waits for the default stream


def mark(dst: Any, block: int) -> None:
    """Overwrite a byte the next pull must rewrite (outside the timing)."""
    if hasattr(dst, "array"):
        dst.array[block, 0] = 255
        return
    import torch

    dst.blocks[block, 0] = 255
    torch.cuda.synchronize()  # NOTE: before a pull on another stream rewrites it


def check(dst: Any, src_ids: list[int], dst_ids: list[int]) -> None:
    """Spot-check: first and last byte of a few pulled blocks carry their source block's byte."""
    for i in {0, len(src_ids) // 2, len(src_ids) - 1}:
        want = src_ids[i] % 251
        got = (_byte(dst, dst_ids[i], 0), _byte(dst, dst_ids[i], -1))
        assert got == (want, want), f"block {src_ids[i]} -> {dst_ids[i]} corrupt: {got} != {want}"


def reps_for(nbytes: int, quick: bool) -> int:
    target = (0.3 if quick else 1.5) * 2e9  # about 0.3 s (1.5 s) worth of bytes at 2 GB/s
    return int(min(200 if quick else 1000, max(3 if quick else 5, target // max(nbytes, 1))))


async def interleaved(
    fns: dict[str, Callable[[], Awaitable[None]]], reps: int, dst: Any, ids: dict[str, tuple[list, list]]
) -> dict[str, list[float]]:
    """Time each function `reps` times, taking turns, so drift (socket buffer autotuning, other
    load) hits the transfer and its ceiling alike; one untimed warm-up call each. Pulls named in
    `ids` are checked after every call (outside the timing)."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            if name in ids:
                mark(dst, ids[name][1][0])  # NOTE: the pull must rewrite it
            t0 = time.perf_counter()
            await fn()
            if rep:
                out[name].append(time.perf_counter() - t0)
            if name in ids:
                check(dst, *ids[name])
    return out


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def ref_for(handle_id: str, token: bytes, layout: KvLayout, num_blocks: int, **extra: Any) -> HandleRef:
    return HandleRef(handle_id=handle_id, token=token, layout=layout, num_blocks=num_blocks, **extra)


# -- shm ------------------------------------------------------------------------------------


async def bench_shm(num_blocks: int, counts: list[int], quick: bool) -> list[dict]:
    rows = []
    with KvPool.create(LAYOUT, num_blocks, shared=True) as src, KvPool.create(LAYOUT, num_blocks) as dst:
        fill(src)
        dst.array[:] = 0
        registry = HandleRegistry()
        shm = ShmTransport(dst, RegistryControl(registry))
        seq = iter(range(1 << 62))

        def pull_fn(src_ids: list[int], dst_ids: list[int]) -> Callable[[], Awaitable[None]]:
            async def pull() -> None:
                h = registry.publish(f"r{next(seq)}", src_ids, len(src_ids) * 16, ttl_s=600)
                ref = ref_for(h.handle_id, h.token, LAYOUT, num_blocks, endpoint="", shm_name=src.name or "")
                await shm.pull(ref, src_ids, dst_ids)
                registry.release(h.handle_id)

            return pull

        for n in counts:
            nbytes = n * BB

            async def memcpy(nbytes: int = nbytes) -> None:
                dst.buffer[:nbytes] = src.buffer[:nbytes]

            ids = {kind: id_sets(n, num_blocks, kind == "scattered", n) for kind in KINDS}
            fns = {"ceiling": memcpy, **{kind: pull_fn(*ids[kind]) for kind in KINDS}}
            reps = reps_for(nbytes, quick)
            times = await interleaved(fns, reps, dst, ids)
            for kind in KINDS:
                rows.append(row("shm", n, kind, reps, times[kind], times["ceiling"], "memcpy"))
        await shm.close()
    return rows


# -- the prefill side, in its own process (tcp, nixl; on CUDA: cuda_ipc, nixl_vram, staged) --


def _server_main(conn, num_blocks: int, loop_kind: str, device: str) -> None:
    """Transfer server over a filled pool, raw-socket ceiling server (host pools), and over the
    pipe: handle publishing/releasing, and a one-sided backend's offer on request (msgpack of its
    source struct, or why there is none)."""
    if device == "cuda":
        pool = device_pool(num_blocks)
        fill_device(pool)
    else:
        pool = KvPool.create(LAYOUT, num_blocks)
        fill(pool)
    registry = HandleRegistry()
    exporters: list = []
    raw = socket.create_server(("127.0.0.1", 0)) if device != "cuda" else None

    def offer(name: str) -> bytes | str:
        """Built on request (after the tcp rows), not at start: an exporter's threads (NIXL's
        progress) then never share the 2 vCPUs with the rows measured before it."""
        try:
            if name == "cuda_ipc":
                from kvtransfer.cuda_ipc import CudaIpcTransport

                t = CudaIpcTransport(pool, RegistryControl(registry))
            else:
                from kvtransfer.nixl import NixlTransport

                why = NixlTransport.unavailable(pool)
                if why is not None:
                    return why
                t = NixlTransport(pool, RegistryControl(registry), name="bench-prefill")
            exporters.append(t)
            return msgspec.msgpack.encode(t.offer()[name])
        except Exception as exc:  # NOTE: reported as skipped rows, not a dead bench
            return f"{type(exc).__name__}: {exc}"

    def raw_serve() -> None:
        assert raw is not None
        sock, _ = raw.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while head := sock.recv(_LEN.size, socket.MSG_WAITALL):
                n = _LEN.unpack(head)[0]
                for i in range(0, n, SEND_CHUNK):
                    sock.sendall(pool.buffer[i : min(n, i + SEND_CHUNK)])

    def serve_pipe(server: TcpTransferServer) -> None:
        conn.send((server.endpoint, raw.getsockname()[1] if raw else 0))
        while (msg := conn.recv()) is not None:
            kind, arg = msg
            if kind == "publish":
                h = registry.publish(f"r{time.perf_counter_ns()}", arg, len(arg) * 16, ttl_s=600)
                conn.send((h.handle_id, h.token))
            elif kind == "release":
                registry.release(arg)
            elif kind == "offer":
                conn.send(offer(arg))

    async def main() -> None:
        server = TcpTransferServer(pool, registry, "127.0.0.1", 0)
        await server.start()
        if raw is not None:
            threading.Thread(target=raw_serve, daemon=True).start()
        await asyncio.to_thread(serve_pipe, server)
        await server.close()
        for t in exporters:
            await t.close()

    run_loop(main(), loop_kind)


class Server:
    """The spawned prefill process and the pipe to it."""

    def __init__(self, num_blocks: int, loop_kind: str, device: str = "cpu") -> None:
        ctx = mp.get_context("spawn")  # NOTE: spawn: two processes sharing the GPU need it
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(child, num_blocks, loop_kind, device), daemon=True)
        self.proc.start()
        self.endpoint = ""
        self.raw_port = 0

    async def started(self) -> None:
        self.endpoint, self.raw_port = await asyncio.to_thread(self.pipe.recv)

    def source(self, name: str) -> Any:
        """Backend `name`'s offer (its exporter is built now, in the server), or why there is none."""
        self.pipe.send(("offer", name))
        offer = self.pipe.recv()
        return offer if isinstance(offer, str) else msgspec.msgpack.decode(offer, type=SOURCES[name])

    def publish(self, src_ids: list[int], count: int) -> list[tuple[str, bytes]]:
        out = []
        for _ in range(count):
            self.pipe.send(("publish", src_ids))
            out.append(self.pipe.recv())
        return out

    def release(self, handles: list[tuple[str, bytes]]) -> None:
        for handle_id, _ in handles:
            self.pipe.send(("release", handle_id))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def pull_fn(transport, refs: list[HandleRef], src_ids: list[int], dst_ids: list[int]):
    it = iter(refs)

    async def pull() -> None:
        await transport.pull(next(it), src_ids, dst_ids)

    return pull


async def claim_all(transport, refs: list[HandleRef]) -> None:
    """Spend the tokens now (over the control channel), outside the timing: `pull` then skips it."""
    for ref in refs:
        await transport.claim(ref)


# -- tcp and nixl (host pools) ---------------------------------------------------------------


def raw_pull(sock: socket.socket, dst: KvPool, nbytes: int) -> None:
    sock.sendall(_LEN.pack(nbytes))
    view, pos = dst.buffer, 0
    while pos < nbytes:
        got = sock.recv_into(view[pos : min(nbytes, pos + RECV_CHUNK)])
        if not got:
            raise EOFError("raw stream closed")
        pos += got


async def bench_tcp(
    num_blocks: int, counts: list[int], quick: bool, loop_kind: str, nixl_counts: list[int] | None = None
) -> list[dict]:
    """tcp rows, then nixl rows (for `nixl_counts`, default `counts`) from the same server."""
    rows = []
    nixl_counts = counts if nixl_counts is None else nixl_counts
    server = Server(num_blocks, loop_kind)
    try:
        with KvPool.create(LAYOUT, num_blocks) as dst:
            dst.array[:] = 0
            await server.started()
            endpoint = server.endpoint
            raw = socket.create_connection(("127.0.0.1", server.raw_port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tcp = TcpTransport(dst, timeout_s=60.0)

            def refs(src_ids: list[int], count: int, **extra: Any) -> list[HandleRef]:
                return [
                    ref_for(hid, tok, LAYOUT, num_blocks, endpoint=endpoint, **extra)
                    for hid, tok in server.publish(src_ids, count)
                ]

            # NOTE: warm both connections up first (TCP buffer autotuning), like long-lived pooled ones
            big = list(range(min(max(counts), 256)))
            warm = pull_fn(tcp, refs(big, 4), big, big)
            for _ in range(4):
                raw_pull(raw, dst, len(big) * BB)
                await warm()
            for n in counts:
                nbytes = n * BB
                reps = reps_for(nbytes, quick)

                async def ceiling(nbytes: int = nbytes) -> None:
                    raw_pull(raw, dst, nbytes)

                ids = {kind: id_sets(n, num_blocks, kind == "scattered", n) for kind in KINDS}
                handles = {kind: refs(ids[kind][0], reps + 1) for kind in KINDS}
                fns = {"ceiling": ceiling, **{k: pull_fn(tcp, handles[k], *ids[k]) for k in KINDS}}
                times = await interleaved(fns, reps, dst, ids)
                for kind in KINDS:
                    server.release([(r.handle_id, r.token) for r in handles[kind]])
                    rows.append(row("tcp", n, kind, reps, times[kind], times["ceiling"], "socket"))
            raw.close()
            if nixl_counts:
                rows += await bench_nixl(server, dst, tcp, refs, nixl_counts, quick)
            await tcp.close()
    finally:
        server.stop()
    return rows


async def bench_nixl(
    server: Server, dst: KvPool, control: TcpTransport, refs, counts: list[int], quick: bool
) -> list[dict]:
    source = server.source("nixl")
    if isinstance(source, str):
        print(f"skipping nixl rows: {source}")
        return []
    from kvtransfer.nixl import NixlTransport

    nixl = NixlTransport(dst, control, name="bench-decode", timeout_s=60.0)
    rows = []
    # NOTE: the memcpy ceiling's source: a second mapping in this process, as for shm
    with KvPool.create(LAYOUT, max(counts)) as local:
        fill(local)
        for n in counts:
            nbytes = n * BB
            reps = reps_for(nbytes, quick)

            async def memcpy(nbytes: int = nbytes) -> None:
                dst.buffer[:nbytes] = local.buffer[:nbytes]

            ids = {kind: id_sets(n, dst.num_blocks, kind == "scattered", n) for kind in KINDS}
            handles = {kind: refs(ids[kind][0], reps + 1, nixl=source) for kind in KINDS}
            for kind in KINDS:
                await claim_all(nixl, handles[kind])
            fns = {"ceiling": memcpy, **{k: pull_fn(nixl, handles[k], *ids[k]) for k in KINDS}}
            times = await interleaved(fns, reps, dst, ids)
            for kind in KINDS:
                server.release([(r.handle_id, r.token) for r in handles[kind]])
                rows.append(row("nixl", n, kind, reps, times[kind], times["ceiling"], "memcpy"))
    await nixl.close()
    return rows


# -- CUDA: cuda_ipc, nixl (VRAM), staged vs. a device-to-device copy ---------------------------


def device_pool(num_blocks: int):
    """A zeroed DevicePool on cuda:0 shaped like the engine's pool tensor."""
    import torch

    from kvtransfer.device_pool import DevicePool

    lay = CUDA_LAYOUT
    shape = (num_blocks, lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_dim)
    return DevicePool(lay, torch.zeros(shape, dtype=torch.bfloat16, device="cuda:0"))


def fill_device(pool) -> None:
    import torch

    idx = torch.arange(pool.num_blocks, device=pool.blocks.device) % 251
    pool.blocks.copy_(idx.to(torch.uint8)[:, None].expand(-1, pool.block_bytes))
    torch.cuda.synchronize()


def cuda_max_blocks(pools: int = 3) -> int:
    """Blocks per pool such that `pools` pools fit in half of the GPU memory free now."""
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    return int(free * 0.5 / pools // CUDA_LAYOUT.block_bytes)


async def bench_cuda(num_blocks: int, counts: list[int], quick: bool, loop_kind: str) -> list[dict]:
    import torch

    from kvtransfer.staged import StagedTransport

    cbb = CUDA_LAYOUT.block_bytes
    rows: list[dict] = []
    server = Server(num_blocks, loop_kind, "cuda")
    transports: dict[str, Any] = {}
    try:
        dst = device_pool(num_blocks)
        local = device_pool(max(counts))  # the d2d ceiling's source, in this process
        fill_device(local)
        await server.started()
        staged = StagedTransport(dst, timeout_s=60.0)  # NOTE: also the control channel (claim, release)
        extra: dict[str, dict[str, Any]] = {"staged": {}}
        source = server.source("cuda_ipc")
        if isinstance(source, str):
            print(f"skipping cuda_ipc rows: {source}")
        else:
            from kvtransfer.cuda_ipc import CudaIpcTransport

            transports["cuda_ipc"] = CudaIpcTransport(dst, staged)
            extra["cuda_ipc"] = {"cuda_ipc": source, "host_id": host_id()}
        source = server.source("nixl")
        if isinstance(source, str):
            print(f"skipping nixl_vram rows: {source}")
        else:
            from kvtransfer.nixl import NixlTransport

            transports["nixl_vram"] = NixlTransport(dst, staged, name="bench-decode", timeout_s=60.0)
            extra["nixl_vram"] = {"nixl": source}
        transports["staged"] = staged
        for n in counts:
            nbytes = n * cbb
            reps = reps_for(nbytes, quick)

            async def d2d(n: int = n) -> None:
                dst.blocks[:n].copy_(local.blocks[:n])
                torch.cuda.synchronize()

            ids = {kind: id_sets(n, num_blocks, kind == "scattered", n) for kind in KINDS}
            fns: dict[str, Callable[[], Awaitable[None]]] = {"ceiling": d2d}
            checks: dict[str, tuple[list, list]] = {}
            published = []
            for name, t in transports.items():
                for kind in KINDS:
                    handles = server.publish(ids[kind][0], reps + 1)
                    published += handles
                    refs = [
                        ref_for(hid, tok, CUDA_LAYOUT, num_blocks, endpoint=server.endpoint, **extra[name])
                        for hid, tok in handles
                    ]
                    if name != "staged":
                        await claim_all(t, refs)
                    fns[f"{name}/{kind}"] = pull_fn(t, refs, *ids[kind])
                    checks[f"{name}/{kind}"] = ids[kind]
            times = await interleaved(fns, reps, dst, checks)
            server.release(published)
            for name in transports:
                for kind in KINDS:
                    t_ = times[f"{name}/{kind}"]
                    rows.append(row(name, n, kind, reps, t_, times["ceiling"], "d2d", cbb))
    finally:
        for t in transports.values():
            await t.close()
        server.stop()
    return rows


# -- report ---------------------------------------------------------------------------------


def row(
    backend: str,
    n: int,
    kind: str,
    reps: int,
    times: list[float],
    ceiling: list[float],
    what: str,
    block_bytes: int = BB,
) -> dict:
    nbytes = n * block_bytes
    got, top = gbps(nbytes, times), gbps(nbytes, ceiling)
    return {
        "backend": backend,
        "blocks": n,
        "ids": kind,
        "mb": round(nbytes / 1e6, 1),
        "reps": reps,
        "p50_ms": statistics.median(times) * 1e3,
        "gbps": got,
        "ceiling": what,
        "ceiling_p50_ms": statistics.median(ceiling) * 1e3,
        "ceiling_gbps": top,
        "vs_ceiling": got / top,
    }


def run_loop(coro, loop_kind: str):
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


TTFT_PROMPT_TOKENS = 2000


def prefill_ttft_s(num_tokens: int, reps: int, device: str = "cpu") -> float:
    """Median time to the first token of a `num_tokens` prompt, nothing cached (real engine)."""
    from workers.engine.engine import Engine
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import SchedulerConfig
    from workers.engine.sequence import SamplingParams
    from workers.model_files import resolve_model

    runner = ModelRunner(
        resolve_model("default"), num_blocks=num_tokens // 16 + 8, threads=os.cpu_count(), device=device
    )
    engine = Engine(runner, SchedulerConfig(max_num_batched_tokens=512))

    async def run() -> list[float]:
        engine.start()
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        times = []
        try:
            for i in range(reps + 1):  # NOTE: the first one warms up
                prompt = [(1000 + 7 * i + j) % 40000 + 100 for j in range(num_tokens)]
                t0 = time.perf_counter()
                async for _ in engine.generate(f"ttft-{i}", prompt, params):
                    pass
                times.append(time.perf_counter() - t0)
                engine.block_manager.clear_cache()
        finally:
            engine.stop()
        return times[1:]

    return statistics.median(asyncio.run(run()))


def ttft_share(rows: list[dict], quick: bool, device: str = "cpu") -> list[dict]:
    ttft_ms = prefill_ttft_s(TTFT_PROMPT_TOKENS, 1 if quick else 3, device) * 1e3
    return [
        {"backend": r["backend"], "blocks": r["blocks"], "transfer_ms": r["p50_ms"], "ttft_ms": ttft_ms,
         "share": r["p50_ms"] / ttft_ms}
        for r in rows
        if r["ids"] == "contiguous"
    ]  # fmt: skip


HEADERS = ["backend", "blocks", "ids", "mb", "reps", "p50_ms", "gbps", "ceiling", "ceiling_p50_ms",
           "ceiling_gbps", "vs_ceiling"]  # fmt: skip


def figures_of(rows: list[dict]) -> dict[str, float]:
    """`<backend>_gbps_<n>` and `<backend>_vs_<ceiling>_<n>` (e.g. shm_vs_memcpy_256) for the
    contiguous pulls of 256 and 4096 blocks."""
    figures: dict[str, float] = {}
    for n in (256, 4096):
        for r in rows:
            if r["blocks"] == n and r["ids"] == "contiguous":
                figures[f"{r['backend']}_gbps_{n}"] = round(r["gbps"], 3)
                figures[f"{r['backend']}_vs_{r['ceiling']}_{n}"] = round(r["vs_ceiling"], 3)
    return figures


def report(rows: list[dict], shares: list[dict], figures: dict[str, float], payload: dict, name: str) -> None:
    print(table(HEADERS, [[r[h] for h in HEADERS] for r in rows]))
    print(f"\ntransfer time as a share of TTFT, {TTFT_PROMPT_TOKENS}-token prompt on the default model")
    print(table(["backend", "blocks", "transfer_ms", "ttft_ms", "share"], [list(r.values()) for r in shares]))
    for r in shares:
        figures[f"{r['backend']}_share_of_ttft_2000"] = round(r["share"], 4)
    if shares:
        figures["ttft_ms_2000"] = round(shares[0]["ttft_ms"], 1)
    path = save(name, {**payload, "rows": rows, "ttft_share": shares, **figures})
    print(f"wrote {path}")
    headline(figures)


def main_cpu(args: argparse.Namespace) -> None:
    cap = min(max_blocks(), args.max_blocks or 1 << 30)
    counts = [n for n in COUNTS if n <= cap]
    skipped = [n for n in COUNTS if n > cap]
    # NOTE: nixl rows need a third pool in the tcp phase (the memcpy ceiling's source)
    nixl_counts = [n for n in counts if n <= max_blocks(pools=3)]
    num_blocks = max(counts) + 64  # NOTE: room for scattered ids
    if skipped:
        print(f"skipping {skipped} blocks: memory allows at most {cap} blocks per pool")
    if nixl_counts != counts:
        print(f"nixl: skipping {sorted(set(counts) - set(nixl_counts))} blocks: no room for a third pool")
    rows = run_loop(bench_shm(num_blocks, counts, args.quick), args.loop)
    rows += run_loop(bench_tcp(num_blocks, counts, args.quick, args.loop, nixl_counts), args.loop)
    figures = figures_of(rows)
    blocks = -(-TTFT_PROMPT_TOKENS // LAYOUT.block_size)
    small = run_loop(bench_shm(blocks + 64, [blocks], True), args.loop)
    small += run_loop(bench_tcp(blocks + 64, [blocks], True, args.loop), args.loop)
    shares = ttft_share(small, args.quick)
    payload = {"quick": args.quick, "loop": args.loop, "device": "cpu", "layout": LAYOUT.describe(),
               "block_bytes": BB, "skipped_blocks": skipped, "cpus": os.cpu_count()}  # fmt: skip
    report(rows, shares, figures, payload, "kvtransfer")


def main_cuda(args: argparse.Namespace) -> None:
    try:
        import torch
    except ImportError:
        raise SystemExit("bench.kvtransfer --device cuda: torch is not installed") from None
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench.kvtransfer --device cuda: no CUDA device here (torch {torch.__version__} sees none); "
            "run it on a GPU machine, or without --device for the CPU backends"
        )
    cap = min(cuda_max_blocks(), args.max_blocks or 1 << 30)
    counts = [n for n in COUNTS if n <= cap]
    skipped = [n for n in COUNTS if n > cap]
    if skipped:
        print(f"skipping {skipped} blocks: GPU memory allows at most {cap} blocks per pool")
    rows = run_loop(bench_cuda(max(counts) + 64, counts, args.quick, args.loop), args.loop)
    figures = figures_of(rows)
    blocks = -(-TTFT_PROMPT_TOKENS // CUDA_LAYOUT.block_size)
    small = run_loop(bench_cuda(blocks + 64, [blocks], True, args.loop), args.loop)
    shares = ttft_share(small, args.quick, "cuda")
    payload = {"quick": args.quick, "loop": args.loop, "device": "cuda",
               "gpu": torch.cuda.get_device_name(0), "layout": CUDA_LAYOUT.describe(),
               "block_bytes": CUDA_LAYOUT.block_bytes, "skipped_blocks": skipped}  # fmt: skip
    report(rows, shares, figures, payload, "kvtransfer_cuda")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="as the workers run")
    parser.add_argument("--max-blocks", type=int, default=None, help="cap on the largest pull")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: GPU pools (cuda_ipc, nixl, staged)"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        main_cuda(args)
    else:
        main_cpu(args)


if __name__ == "__main__":
    sys.exit(main())

"""KV transfer throughput: shm and tcp pulls vs. their ceilings, measured in the same run.

    python -m bench.kvtransfer [--quick] [--loop uvloop|asyncio] [--max-blocks N]

Layout: the default model's (SmolLM2-135M: 30 layers, 3 KV heads, head dim 64, block size 16,
float32 -> 737,280 B per block). Pulls of 1, 16, 256 and 4096 blocks (4096 blocks is ~3 GB per
pool; capped by available memory and /dev/shm space, see `max_blocks`), each with contiguous ids
(one run: one copy) and scattered ids (random source and destination blocks: one copy per block).

- shm: `ShmTransport.pull` from a shared pool (a fresh handle per pull, claimed in-process: a real
  worker adds one gRPC round trip for the claim) vs. the ceiling, one memoryview memcpy of the
  same bytes between the same two mappings.
- tcp: `TcpTransport.pull` from a `TcpTransferServer` in another process over 127.0.0.1 (fresh
  handle per pull, pooled connection) vs. the ceiling, a raw stream of the same byte count
  between two plain blocking sockets in two processes (one request round trip, then `sendall`
  from the server's pool / `recv_into` the destination pool, with the transport's syscall sizes:
  sends of 1 MiB, receives of 256 KiB, which were the fastest plain-socket sizes we measured).

TTFT share: the prefill of a 2,000-token prompt on the default model (our engine, in-process, as
a prefill worker runs it: chunked by the worker's default 512-token step budget) next to the pull
of its 125 blocks over shm and tcp: transfer time / TTFT.

GB/s = 1e9 bytes per second, median over the repetitions. Both pools are touched before timing
(an engine's pool is allocated and zeroed at start-up, so page faults are not part of a pull).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from bench.common import headline, save, table
from kvtransfer.handles import HandleRegistry
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.shm import ShmTransport
from kvtransfer.tcp import RECV_CHUNK, SEND_CHUNK, TcpTransferServer, TcpTransport
from kvtransfer.transport import HandleRef

LAYOUT = KvLayout(dtype="float32", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
BB = LAYOUT.block_bytes
COUNTS = (1, 16, 256, 4096)
KINDS = ("contiguous", "scattered")
_LEN = struct.Struct("<Q")


def max_blocks() -> int:
    """Blocks per pool such that two pools fit in half the available memory and in /dev/shm."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else avail
    return int(min(avail * 0.5 / 2, shm_free * 0.8) // BB)


def fill(pool: KvPool) -> None:
    """A different byte per block, written everywhere (touches every page)."""
    pool.array[:] = (np.arange(pool.num_blocks, dtype=np.uint32) % 251).astype(np.uint8)[:, None]


def id_sets(n: int, num_blocks: int, scattered: bool, seed: int) -> tuple[list[int], list[int]]:
    if not scattered:
        return list(range(n)), list(range(n))
    rng = np.random.default_rng(seed)
    return rng.permutation(num_blocks)[:n].tolist(), rng.permutation(num_blocks)[:n].tolist()


def check(dst: KvPool, src_ids: list[int], dst_ids: list[int]) -> None:
    """Spot-check: first and last byte of a few pulled blocks carry their source block's byte."""
    for i in {0, len(src_ids) // 2, len(src_ids) - 1}:
        want = src_ids[i] % 251
        got = dst.array[dst_ids[i]]
        assert got[0] == want and got[-1] == want, f"block {src_ids[i]} -> {dst_ids[i]} corrupt"


def reps_for(nbytes: int, quick: bool) -> int:
    target = (0.3 if quick else 1.5) * 2e9  # about 0.3 s (1.5 s) worth of bytes at 2 GB/s
    return int(min(200 if quick else 1000, max(3 if quick else 5, target // max(nbytes, 1))))


async def interleaved(
    fns: dict[str, Callable[[], Awaitable[None]]], reps: int, dst: KvPool, ids: dict[str, tuple[list, list]]
) -> dict[str, list[float]]:
    """Time each function `reps` times, taking turns, so drift (socket buffer autotuning, other
    load) hits the transfer and its ceiling alike; one untimed warm-up call each. Pulls named in
    `ids` are checked after every call (outside the timing)."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            if name in ids:
                dst.array[ids[name][1][0], 0] = 255  # NOTE: the pull must rewrite it
            t0 = time.perf_counter()
            await fn()
            if rep:
                out[name].append(time.perf_counter() - t0)
            if name in ids:
                check(dst, *ids[name])
    return out


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


# -- shm ------------------------------------------------------------------------------------


async def bench_shm(num_blocks: int, counts: list[int], quick: bool) -> list[dict]:
    rows = []
    with KvPool.create(LAYOUT, num_blocks, shared=True) as src, KvPool.create(LAYOUT, num_blocks) as dst:
        fill(src)
        dst.array[:] = 0
        registry = HandleRegistry()

        async def claim(ref: HandleRef) -> None:
            registry.claim(ref.handle_id, ref.token)

        shm = ShmTransport(dst, claim)
        seq = iter(range(1 << 62))

        def pull_fn(src_ids: list[int], dst_ids: list[int]) -> Callable[[], Awaitable[None]]:
            async def pull() -> None:
                h = registry.publish(f"r{next(seq)}", src_ids, len(src_ids) * 16, ttl_s=600)
                ref = HandleRef(
                    handle_id=h.handle_id, token=h.token, endpoint="", backend="shm", layout=LAYOUT,
                    shm_name=src.name or "", num_blocks=num_blocks,
                )  # fmt: skip
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


# -- tcp ------------------------------------------------------------------------------------


def _server_main(conn, num_blocks: int, loop_kind: str) -> None:
    """The prefill side, in its own process: transfer server, raw-socket ceiling server, and
    handle publishing over the pipe."""
    pool = KvPool.create(LAYOUT, num_blocks)
    fill(pool)
    registry = HandleRegistry()
    raw = socket.create_server(("127.0.0.1", 0))

    def raw_serve() -> None:
        sock, _ = raw.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while head := sock.recv(_LEN.size, socket.MSG_WAITALL):
                n = _LEN.unpack(head)[0]
                for i in range(0, n, SEND_CHUNK):
                    sock.sendall(pool.buffer[i : min(n, i + SEND_CHUNK)])

    def control(server: TcpTransferServer) -> None:
        conn.send((server.endpoint, raw.getsockname()[1]))
        while (msg := conn.recv()) is not None:
            kind, arg = msg
            if kind == "publish":
                h = registry.publish(f"r{time.perf_counter_ns()}", arg, len(arg) * 16, ttl_s=600)
                conn.send((h.handle_id, h.token))
            elif kind == "release":
                registry.release(arg)

    async def main() -> None:
        server = TcpTransferServer(pool, registry, "127.0.0.1", 0)
        await server.start()
        threading.Thread(target=raw_serve, daemon=True).start()
        await asyncio.to_thread(control, server)
        await server.close()

    run_loop(main(), loop_kind)


def raw_pull(sock: socket.socket, dst: KvPool, nbytes: int) -> None:
    sock.sendall(_LEN.pack(nbytes))
    view, pos = dst.buffer, 0
    while pos < nbytes:
        got = sock.recv_into(view[pos : min(nbytes, pos + RECV_CHUNK)])
        if not got:
            raise EOFError("raw stream closed")
        pos += got


async def bench_tcp(num_blocks: int, counts: list[int], quick: bool, loop_kind: str) -> list[dict]:
    rows = []
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(child, num_blocks, loop_kind), daemon=True)
    proc.start()
    try:
        with KvPool.create(LAYOUT, num_blocks) as dst:
            dst.array[:] = 0
            endpoint, raw_port = await asyncio.to_thread(parent.recv)
            raw = socket.create_connection(("127.0.0.1", raw_port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tcp = TcpTransport(dst, timeout_s=60.0)

            def publish(src_ids: list[int], count: int) -> list[tuple[str, str]]:
                out = []
                for _ in range(count):
                    parent.send(("publish", src_ids))
                    out.append(parent.recv())
                return out

            def pull_fn(handles: list[tuple[str, str]], src_ids: list[int], dst_ids: list[int]):
                it = iter(handles)

                async def pull() -> None:
                    handle_id, token = next(it)
                    ref = HandleRef(
                        handle_id=handle_id, token=token, endpoint=endpoint, backend="tcp", layout=LAYOUT,
                        num_blocks=num_blocks,
                    )  # fmt: skip
                    await tcp.pull(ref, src_ids, dst_ids)

                return pull

            # NOTE: warm both connections up first (TCP buffer autotuning), like long-lived pooled ones
            big = list(range(min(max(counts), 256)))
            warm = pull_fn(publish(big, 4), big, big)
            for _ in range(4):
                raw_pull(raw, dst, len(big) * BB)
                await warm()
            for n in counts:
                nbytes = n * BB
                reps = reps_for(nbytes, quick)

                async def ceiling(nbytes: int = nbytes) -> None:
                    raw_pull(raw, dst, nbytes)

                ids = {kind: id_sets(n, num_blocks, kind == "scattered", n) for kind in KINDS}
                handles = {kind: publish(ids[kind][0], reps + 1) for kind in KINDS}
                fns = {"ceiling": ceiling, **{k: pull_fn(handles[k], *ids[k]) for k in KINDS}}
                times = await interleaved(fns, reps, dst, ids)
                for kind in KINDS:
                    for handle_id, _ in handles[kind]:
                        parent.send(("release", handle_id))
                    rows.append(row("tcp", n, kind, reps, times[kind], times["ceiling"], "socket"))
            await tcp.close()
            raw.close()
    finally:
        parent.send(None)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return rows


# -- report ---------------------------------------------------------------------------------


def row(
    backend: str, n: int, kind: str, reps: int, times: list[float], ceiling: list[float], what: str
) -> dict:
    got, top = gbps(n * BB, times), gbps(n * BB, ceiling)
    return {
        "backend": backend,
        "blocks": n,
        "ids": kind,
        "mb": round(n * BB / 1e6, 1),
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


def prefill_ttft_s(num_tokens: int, reps: int) -> float:
    """Median time to the first token of a `num_tokens` prompt, nothing cached (real engine)."""
    from workers.engine.engine import Engine
    from workers.engine.model_runner import ModelRunner
    from workers.engine.scheduler import SchedulerConfig
    from workers.engine.sequence import SamplingParams
    from workers.model_files import resolve_model

    runner = ModelRunner(resolve_model("default"), num_blocks=num_tokens // 16 + 8, threads=os.cpu_count())
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


def ttft_share(rows: list[dict], quick: bool) -> list[dict]:
    ttft_ms = prefill_ttft_s(TTFT_PROMPT_TOKENS, 1 if quick else 3) * 1e3
    return [
        {"backend": r["backend"], "blocks": r["blocks"], "transfer_ms": r["p50_ms"], "ttft_ms": ttft_ms,
         "share": r["p50_ms"] / ttft_ms}
        for r in rows
        if r["ids"] == "contiguous"
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="as the workers run")
    parser.add_argument("--max-blocks", type=int, default=None, help="cap on the largest pull")
    args = parser.parse_args()
    cap = min(max_blocks(), args.max_blocks or 1 << 30)
    counts = [n for n in COUNTS if n <= cap]
    skipped = [n for n in COUNTS if n > cap]
    num_blocks = max(counts) + 64  # NOTE: room for scattered ids
    if skipped:
        print(f"skipping {skipped} blocks: memory allows at most {cap} blocks per pool")
    rows = run_loop(bench_shm(num_blocks, counts, args.quick), args.loop)
    rows += run_loop(bench_tcp(num_blocks, counts, args.quick, args.loop), args.loop)
    headers = ["backend", "blocks", "ids", "mb", "reps", "p50_ms", "gbps", "ceiling", "ceiling_p50_ms",
               "ceiling_gbps", "vs_ceiling"]  # fmt: skip
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    figures: dict[str, float] = {}
    for n in (256, 4096):
        for r in rows:
            if r["blocks"] == n and r["ids"] == "contiguous":
                figures[f"{r['backend']}_gbps_{n}"] = round(r["gbps"], 3)
                key = "shm_vs_memcpy" if r["backend"] == "shm" else "tcp_vs_socket"
                figures[f"{key}_{n}"] = round(r["vs_ceiling"], 3)
    blocks = -(-TTFT_PROMPT_TOKENS // LAYOUT.block_size)
    small = run_loop(bench_shm(blocks + 64, [blocks], True), args.loop)
    small += run_loop(bench_tcp(blocks + 64, [blocks], True, args.loop), args.loop)
    shares = ttft_share(small, args.quick)
    print(f"\ntransfer time as a share of TTFT, {TTFT_PROMPT_TOKENS}-token prompt on the default model")
    print(table(["backend", "blocks", "transfer_ms", "ttft_ms", "share"], [list(r.values()) for r in shares]))
    for r in shares:
        figures[f"{r['backend']}_share_of_ttft_2000"] = round(r["share"], 4)
    figures["ttft_ms_2000"] = round(shares[0]["ttft_ms"], 1)
    path = save(
        "kvtransfer",
        {
            "quick": args.quick,
            "loop": args.loop,
            "layout": LAYOUT.describe(),
            "block_bytes": BB,
            "skipped_blocks": skipped,
            "cpus": os.cpu_count(),
            "rows": rows,
            "ttft_share": shares,
            **figures,
        },
    )
    print(f"wrote {path}")
    headline(figures)


if __name__ == "__main__":
    main()

"""The nixl backend: NVIDIA NIXL (UCX) moving KV between two pools in host memory.

In one process: two mock engines behind two WorkerServices whose agents pull over NIXL, with the
transfer broken in the ways that happen (each must end in a recompute that equals the aggregated
output, with the reason logged and counted, and nothing left pinned). Across processes: a
prefill pool in another process, killed before the read (the read fails fast and cleanly).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time

import msgspec
import pytest

from kvtransfer.errors import TransferError
from kvtransfer.fake import NoControl
from kvtransfer.layout import KvLayout
from kvtransfer.nixl import NixlTransport, nixl_module
from kvtransfer.pool import KvPool
from kvtransfer.transport import HandleRef, NixlSource
from pdrouter_proto import worker_pb2 as pb
from tests.test_kv_agent import PROMPT, Worker, _aggregated, _decode, _disaggregated, _params, _settled

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nixl_module() is None, reason="NIXL is not installed (make setup installs nixl-cu12)"),
]

LAYOUT = KvLayout(dtype="float32", num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)


async def test_nixl_pull_equals_aggregated_and_moves_every_block() -> None:
    async with Worker("prefill") as pre, Worker("decode", "nixl") as dec, Worker("both") as ref:
        assert "nixl" in dec.agent.transports.by_name, dec.agent.transports.missing
        want = await _aggregated(ref, "ref")
        assert await _disaggregated(pre, dec, "r1") == want
        s = dec.stats()
        assert (s.pulls, s.pull_failures, s.blocks_pulled) == (1, 0, 10)
        assert dict(s.pulls_by_backend) == {"nixl": 1}  # not a silent fallback to shm or tcp
        await _settled(pre, dec)


async def test_nixl_pulls_only_the_blocks_the_decode_worker_lacks() -> None:
    async with Worker("prefill") as pre, Worker("decode", "nixl") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")
        half = pb.DecodeRequest(request_id="warm", prompt_token_ids=PROMPT[:20], params=_params(1))
        await _decode(dec, half)  # the decode worker now caches the first 5 of the 10 blocks
        assert await _disaggregated(pre, dec, "r2") == want
        s = dec.stats()
        assert s.blocks_pulled == 5 and dict(s.pulls_by_backend) == {"nixl": 1}
        await _settled(pre, dec)


async def test_handle_is_released_when_the_pull_ends() -> None:
    """Not at the first decode output: the prefill blocks go back as soon as the copy is over."""
    async with Worker("prefill") as pre, Worker("decode", "nixl") as dec:
        resp = await pre.service.Prefill(
            pb.PrefillRequest(request_id="r3", prompt_token_ids=PROMPT, params=_params(4)), None
        )
        handle = resp.ok.handle
        assert pre.agent.registry.num_pinned == 1
        imp = dec.agent.importer("r3", handle)
        await imp.pull(list(handle.block_ids[:4]), [0, 1, 2, 3])
        assert imp.released and pre.agent.registry.num_pinned == 0
        assert dict(dec.stats().pulls_by_backend) == {"nixl": 1}
        await _settled(pre, dec)


def _wrong_token(handle: pb.KvHandle) -> None:
    handle.token = bytes(16)


def _other_layout(handle: pb.KvHandle) -> None:
    handle.layout.head_dim *= 2


@pytest.mark.parametrize(
    ("case", "tamper", "kind", "logged"),
    [
        ("wrong token", _wrong_token, "refused", "wrong token"),
        ("layout mismatch", _other_layout, "layout_mismatch", "layout mismatch"),
    ],
)
async def test_broken_handle_recomputes_counts_and_unpins(caplog, case, tamper, kind, logged) -> None:
    caplog.set_level(logging.WARNING, logger="pdrouter.worker.kv")
    async with Worker("prefill", ttl_s=0.3) as pre, Worker("decode", "nixl") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")
        assert await _disaggregated(pre, dec, "r4", tamper=tamper) == want, case
        s = dec.stats()
        assert (s.pulls, s.pull_failures, dict(s.failures_by_reason)) == (0, 1, {kind: 1})
        assert logged in caplog.text and "recomputing" in caplog.text
        await _settled(pre, dec)  # released after the failure, or (a wrong token) by the TTL
        assert pre.agent.registry.num_pinned == 0


async def test_reused_token_is_refused_and_recomputed(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pdrouter.worker.kv")
    async with (
        Worker("prefill") as pre, Worker("decode", "nixl") as dec, Worker("decode", "nixl") as other,
        Worker("both") as ref,
    ):  # fmt: skip
        want = await _aggregated(ref, "ref", 4)
        resp = await pre.service.Prefill(
            pb.PrefillRequest(request_id="r5", prompt_token_ids=PROMPT, params=_params(4)), None
        )
        first = resp.ok.first.token_ids
        for worker in (dec, other):  # the second decode worker (empty cache) replays the spent handle
            request = pb.DecodeRequest(
                request_id="r5", prompt_token_ids=PROMPT, params=_params(4),
                generated_token_ids=first, kv_handle=resp.ok.handle,
            )  # fmt: skip
            assert list(first) + await _decode(worker, request) == want
        assert dict(dec.stats().pulls_by_backend) == {"nixl": 1}
        s = other.stats()
        assert (s.pulls, dict(s.failures_by_reason)) == (0, {"refused": 1})
        assert "already used" in caplog.text
        await _settled(pre, dec, other)


async def test_expired_handle_is_refused_and_recomputed(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pdrouter.worker.kv")
    async with Worker("prefill", ttl_s=0.2) as pre, Worker("decode", "nixl") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref", 4)
        resp = await pre.service.Prefill(
            pb.PrefillRequest(request_id="r6", prompt_token_ids=PROMPT, params=_params(4)), None
        )
        async with asyncio.timeout(10):
            while not pre.stats().handles_expired:  # the sweep (every second) unpins it
                await asyncio.sleep(0.05)
        request = pb.DecodeRequest(
            request_id="r6", prompt_token_ids=PROMPT, params=_params(4),
            generated_token_ids=resp.ok.first.token_ids, kv_handle=resp.ok.handle,
        )  # fmt: skip
        assert list(resp.ok.first.token_ids) + await _decode(dec, request) == want
        assert dict(dec.stats().failures_by_reason) == {"refused": 1}
        assert "expired" in caplog.text
        await _settled(pre, dec)


# -- across processes -------------------------------------------------------------------------


def _prefill_side(conn) -> None:
    """Another process's pool, registered with NIXL; its source goes back over the pipe."""
    pool = KvPool.create(LAYOUT, 32)
    pool.array[:] = 7
    nixl = NixlTransport(pool, NoControl(), name="peer")
    conn.send(msgspec.msgpack.encode(nixl.offer()["nixl"]))
    conn.recv()  # until the test kills us


async def test_peer_process_killed_before_the_read_fails_fast_with_a_transfer_error() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_side, args=(child,), daemon=True)
    proc.start()
    try:
        source = msgspec.msgpack.decode(await asyncio.to_thread(parent.recv), type=NixlSource)
        with KvPool.create(LAYOUT, 32) as dst:
            nixl = NixlTransport(dst, NoControl(), name="test")
            try:
                ref = HandleRef(handle_id="h", token=bytes(16), endpoint="", layout=LAYOUT,
                                num_blocks=32, nixl=source)  # fmt: skip
                await nixl.pull(ref, [0, 1, 2], [5, 6, 7])
                assert (dst.array[5:8] == 7).all() and (dst.array[:5] == 0).all()
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
                t0 = time.monotonic()
                with pytest.raises(TransferError, match="may be gone"):
                    await nixl.pull(ref, [3, 4], [8, 9])
                assert time.monotonic() - t0 < 5.0
                assert nixl.stats.num_failures == 1 and nixl.stats.num_pulls == 1
            finally:
                await nixl.close()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)

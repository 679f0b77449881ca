"""The workers' KV agents end to end in one process: two mock engines behind two WorkerServices,
pulling over real shm and tcp on 127.0.0.1, with the transfer broken in the ways that happen."""

from __future__ import annotations

import asyncio
import logging

import pytest

import kvtransfer.tcp
from pdrouter_proto import worker_pb2 as pb
from tests.engine_helpers import make_spec
from workers.engine.engine import Engine
from workers.engine.scheduler import SchedulerConfig
from workers.kv_agent import KvAgent
from workers.mock.runner import MockRunner
from workers.service import WorkerService

pytestmark = pytest.mark.integration

PROMPT = list(range(300, 340))  # 40 tokens: 10 blocks of 4


class Worker:
    def __init__(self, role: str, backend: str = "auto", ttl_s: float = 30.0) -> None:
        runner = MockRunner(make_spec(block_size=4), 64, shared_kv=role != "decode")
        self.engine = Engine(runner, SchedulerConfig())
        self.service = WorkerService(worker_id=role, role=role, engine_kind="mock")
        self.backend, self.ttl_s = backend, ttl_s
        self.agent: KvAgent | None = None

    async def __aenter__(self) -> Worker:
        self.engine.start()
        self.agent = KvAgent.create(
            self.engine, self.service.worker_id, "t", "127.0.0.1", 0, self.backend, self.ttl_s
        )
        await self.agent.start()
        self.service.attach(self.engine, self.agent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.agent is not None
        await self.agent.close()
        self.engine.stop()

    def stats(self) -> pb.KvTransferStats:
        return self.service.load_report().kv_transfer


def _params(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _decode(worker: Worker, request: pb.DecodeRequest) -> list[int]:
    tokens: list[int] = []
    async for resp in worker.service.Decode(request, None):
        kind = resp.WhichOneof("kind")
        assert kind != "error", resp.error.message
        if kind == "chunk":
            tokens += resp.chunk.token_ids
    return tokens


async def _disaggregated(pre: Worker, dec: Worker, rid: str, n: int = 6, tamper=None) -> list[int]:
    resp = await pre.service.Prefill(
        pb.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT, params=_params(n)), None
    )
    assert resp.WhichOneof("result") == "ok", resp.error.message
    result = resp.ok
    assert result.handle.token and len(result.handle.token) == 16
    if tamper is not None:
        tamper(result.handle)
    request = pb.DecodeRequest(
        request_id=rid, prompt_token_ids=PROMPT, params=_params(n),
        generated_token_ids=result.first.token_ids, kv_handle=result.handle,
    )  # fmt: skip
    return list(result.first.token_ids) + await _decode(dec, request)


async def _aggregated(worker: Worker, rid: str, n: int = 6) -> list[int]:
    return await _decode(worker, pb.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, params=_params(n)))


async def _settled(*workers: Worker) -> None:
    """Releases run in the background and the expiry sweep each second: poll, bounded."""
    async with asyncio.timeout(10):
        while any(w.stats().handles_pinned or w.engine.block_manager.num_used_blocks for w in workers):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", ["shm", "tcp"])
async def test_pull_equals_aggregated_and_releases(backend: str) -> None:
    async with Worker("prefill") as pre, Worker("decode", backend) as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")
        assert await _disaggregated(pre, dec, "r1") == want
        s = dec.stats()
        assert (s.pulls, s.pull_failures, s.blocks_pulled) == (1, 0, 10)
        assert dict(s.pulls_by_backend) == {backend: 1}  # the backend asked for, not a fallback
        await _settled(pre, dec)
        assert pre.stats().handles_published == 1


async def test_wrong_token_is_refused_logged_and_recomputed(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pdrouter.worker.kv")

    def corrupt(handle: pb.KvHandle) -> None:
        handle.token = bytes(16)

    async with Worker("prefill", ttl_s=0.3) as pre, Worker("decode", "tcp") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")
        assert await _disaggregated(pre, dec, "r2", tamper=corrupt) == want
        assert dec.stats().pull_failures == 1 and dec.stats().pulls == 0
        assert "wrong token" in caplog.text
        await _settled(pre, dec)  # the TTL gives the blocks back: the real token was never used
        assert pre.stats().handles_expired == 1


async def test_transfer_killed_mid_pull_recomputes(monkeypatch) -> None:
    real_send = kvtransfer.tcp._send_parts

    async def send_header_then_die(loop, sock, parts) -> None:
        await real_send(loop, sock, parts[:1])  # the OK header, then no block bytes: the peer dies
        sock.close()

    async with Worker("prefill") as pre, Worker("decode", "tcp") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")
        monkeypatch.setattr(kvtransfer.tcp, "_send_parts", send_header_then_die)
        assert await _disaggregated(pre, dec, "r3") == want
        assert dec.stats().pull_failures == 1
        monkeypatch.setattr(kvtransfer.tcp, "_send_parts", real_send)
        await _settled(pre, dec)


async def test_prefill_worker_gone_before_the_pull_recomputes() -> None:
    async with Worker("prefill") as pre, Worker("decode", "tcp") as dec, Worker("both") as ref:
        want = await _aggregated(ref, "ref")

        def server_gone(handle: pb.KvHandle) -> None:
            handle.endpoint = "127.0.0.1:1"  # nothing listens there

        assert await _disaggregated(pre, dec, "r4", tamper=server_gone) == want
        assert dec.stats().pull_failures == 1


async def test_layout_mismatch_names_both_sides(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pdrouter.worker.kv")

    def other_layout(handle: pb.KvHandle) -> None:
        handle.layout.head_dim *= 2

    async with Worker("prefill") as pre, Worker("decode", "shm") as dec:
        await _disaggregated(pre, dec, "r5", tamper=other_layout)
        assert dec.stats().pull_failures == 1
        assert (
            "layout mismatch" in caplog.text and "head_dim=8" in caplog.text and "head_dim=16" in caplog.text
        )


async def test_decode_worker_with_the_prefix_pulls_only_the_rest() -> None:
    async with Worker("prefill") as pre, Worker("decode", "shm") as dec:
        half = pb.DecodeRequest(request_id="warm", prompt_token_ids=PROMPT[:20], params=_params(1))
        await _decode(dec, half)  # the decode worker now caches the first 5 blocks
        await _disaggregated(pre, dec, "r6")
        assert dec.stats().blocks_pulled == 5
        await _settled(pre, dec)


async def test_release_rpc_unpins_and_is_idempotent() -> None:
    async with Worker("prefill") as pre:
        resp = await pre.service.Prefill(
            pb.PrefillRequest(request_id="r7", prompt_token_ids=PROMPT, params=_params(4)), None
        )
        token = resp.ok.handle.token
        assert pre.stats().handles_pinned == 1
        wrong = await pre.service.Release(pb.ReleaseRequest(request_id="r7", token=bytes(16)), None)
        assert not wrong.released and pre.stats().handles_pinned == 1
        first = await pre.service.Release(pb.ReleaseRequest(request_id="r7", token=token), None)
        again = await pre.service.Release(pb.ReleaseRequest(request_id="r7", token=token), None)
        assert first.released and not again.released
        await _settled(pre)


async def test_first_token_ending_the_request_publishes_nothing() -> None:
    async with Worker("prefill") as pre:
        resp = await pre.service.Prefill(
            pb.PrefillRequest(request_id="r8", prompt_token_ids=PROMPT, params=_params(1)), None
        )
        assert not resp.ok.handle.token and resp.ok.finish_reason == pb.FINISH_REASON_LENGTH
        await _settled(pre)

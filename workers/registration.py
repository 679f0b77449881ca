"""A worker's entry in etcd, so routers watching the prefix find it (`--register etcd://...`).

Lifecycle: grant a lease (`--register-ttl-s`, default 10) -> put one key per worker instance,
PREFIX + its gRPC address, under that lease -> renew the lease every TTL/3 -> on SIGTERM, before
the drain, revoke it: every key goes at once and routers stop sending new work.
A worker that dies without revoking (kill -9, a lost host) is gone when its lease expires.

etcd unreachable: the keys stay until their lease runs out; the worker keeps retrying with
back-off and, once etcd answers again, renews the lease or (if it expired meanwhile) grants a
new one and puts its keys again. The worker serves throughout; only its listing depends on etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from workers.etcd import EtcdClient, EtcdError, parse_etcd_url

log = logging.getLogger("pdrouter.worker.registration")


class WorkerRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The JSON value of a worker's key; routers need `address`, the rest is for people."""

    address: str  # gRPC HOST:PORT routers dial
    worker_id: str = ""
    role: str = "both"
    model: str = ""
    engine: str = ""
    version: str = ""


RECORD_DECODER = msgspec.json.Decoder(WorkerRecord)


class Registration:
    def __init__(self, url: str, records: list[WorkerRecord], ttl_s: int = 10) -> None:
        target = parse_etcd_url(url)
        self.client = EtcdClient(target.endpoints)
        self.prefix = target.prefix
        self.records = records
        self.ttl_s = max(1, ttl_s)
        self.lease_id = 0  # NOTE: 0 until the keys are in etcd under a live lease
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None

    def keys(self) -> list[str]:
        return [self.prefix + r.address for r in self.records]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="etcd-registration")

    async def _register(self) -> None:
        lease = await self.client.grant(self.ttl_s)
        for key, record in zip(self.keys(), self.records):
            await self.client.put(key, msgspec.json.encode(record), lease.lease_id)
        self.lease_id = lease.lease_id
        self.registered.set()
        log.info(
            "registered in etcd: %s (lease %x, TTL %d s)", ", ".join(self.keys()), lease.lease_id, lease.ttl
        )

    async def _run(self) -> None:
        period = self.ttl_s / 3
        backoff = 0.1
        while True:
            try:
                if not self.lease_id:
                    await self._register()
                await asyncio.sleep(period)  # NOTE: the keep-alive period, not synchronisation
                if await self.client.keep_alive(self.lease_id) <= 0:
                    log.warning("etcd lease %x expired; registering again", self.lease_id)
                    self.lease_id = 0
                    continue
                backoff = 0.1
            except (EtcdError, msgspec.DecodeError) as exc:
                log.warning("etcd registration: %s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)  # NOTE: back-off while etcd is unreachable
                backoff = min(backoff * 2, period)

    async def close(self) -> None:
        """Deregister: stop renewing and revoke the lease (its keys go with it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lease_id, self.lease_id = self.lease_id, 0
        if not lease_id:
            return
        try:
            await self.client.revoke(lease_id)
            log.info("deregistered from etcd: %s", ", ".join(self.keys()))
        except EtcdError as exc:
            log.warning("etcd deregistration failed (%s); the keys go when lease %x expires", exc, lease_id)

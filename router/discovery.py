"""Where the workers are: a static list, a DNS name resolved again and again, or etcd.

DNS is how a Kubernetes headless service lists its pods (one A/AAAA record per ready pod):
`--discovery dns://NAME:PORT` resolves NAME every `--discovery-interval-s` and adds or removes
workers by the difference, so pods that come and go need no router restart.

etcd: workers put themselves under a prefix with a lease (`pdrouter worker --register
etcd://HOST:PORT/PREFIX`, workers/registration.py). `--discovery etcd://HOST:PORT/PREFIX` lists
the prefix, then watches it from the next revision: a key put adds its worker, a key deleted
(revoked at drain, or its lease expired) removes it. A broken watch or an unreachable etcd
changes nothing; after a back-off the router lists again and applies the difference.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import msgspec

from workers.etcd import EtcdClient, EtcdError, KeyValue, parse_etcd_url
from workers.registration import RECORD_DECODER

log = logging.getLogger("pdrouter.router.discovery")

Resolver = Callable[[str, int], Awaitable[set[str]]]
OnAdd = Callable[[str], object]
OnRemove = Callable[[str], Awaitable[None]]


async def resolve(name: str, port: int) -> set[str]:
    """Every address NAME resolves to, as HOST:PORT (IPv6 in brackets)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, addr in infos:
        host = addr[0]
        out.add(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return out


def parse_dns(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "dns" or not parts.hostname or not parts.port:
        raise ValueError(f"--discovery wants dns://NAME:PORT; got {url!r}")
    return parts.hostname, parts.port


class DnsDiscovery:
    def __init__(self, url: str, interval_s: float = 5.0, resolver: Resolver = resolve) -> None:
        self.name, self.port = parse_dns(url)
        self.interval_s = interval_s
        self.resolver = resolver
        self.known: set[str] = set()

    async def refresh(
        self, on_add: Callable[[str], object], on_remove: Callable[[str], Awaitable[None]]
    ) -> None:
        """One round: resolve, then add what is new and remove what is gone. A failed lookup
        changes nothing (a DNS hiccup must not empty the pool)."""
        try:
            found = await self.resolver(self.name, self.port)
        except OSError as exc:
            log.warning("resolving %s failed: %s; keeping %d workers", self.name, exc, len(self.known))
            return
        for address in sorted(found - self.known):
            on_add(address)
        for address in sorted(self.known - found):
            await on_remove(address)
        self.known = found

    async def run(self, on_add: Callable[[str], object], on_remove: Callable[[str], Awaitable[None]]) -> None:
        while True:
            await self.refresh(on_add, on_remove)
            await asyncio.sleep(self.interval_s)  # the re-resolve period


class EtcdDiscovery:
    def __init__(self, url: str, client: EtcdClient | None = None) -> None:
        target = parse_etcd_url(url)
        self.prefix = target.prefix
        self.client = client or EtcdClient(target.endpoints)
        self.known: set[str] = set()  # worker addresses in the pool because of etcd
        self._keys: dict[bytes, str] = {}  # etcd key -> worker address

    def _address(self, kv: KeyValue) -> str:
        """The record's address; a value that is not a record falls back to the key's last part."""
        try:
            return RECORD_DECODER.decode(kv.value).address
        except msgspec.DecodeError:
            return kv.key.decode(errors="replace")[len(self.prefix) :]

    async def _apply(self, on_add: OnAdd, on_remove: OnRemove) -> None:
        found = set(self._keys.values())
        for address in sorted(found - self.known):
            on_add(address)
        for address in sorted(self.known - found):
            await on_remove(address)
        self.known = found

    async def sync(self, on_add: OnAdd, on_remove: OnRemove) -> int:
        """List the prefix and apply the difference; the revision to watch from."""
        revision, kvs = await self.client.get_prefix(self.prefix)
        self._keys = {kv.key: self._address(kv) for kv in kvs}
        await self._apply(on_add, on_remove)
        return revision + 1

    async def watch(self, on_add: OnAdd, on_remove: OnRemove, start_revision: int) -> None:
        async for batch in self.client.watch_prefix(self.prefix, start_revision):
            for event in batch.events:
                if event.type == "DELETE":
                    self._keys.pop(event.kv.key, None)
                else:
                    self._keys[event.kv.key] = self._address(event.kv)
            await self._apply(on_add, on_remove)

    async def run(self, on_add: OnAdd, on_remove: OnRemove) -> None:
        backoff = 0.1
        while True:
            try:
                start = await self.sync(on_add, on_remove)
                log.info("etcd %s: %d workers, watching from %d", self.prefix, len(self.known), start)
                backoff = 0.1
                await self.watch(on_add, on_remove, start)
            except (EtcdError, msgspec.DecodeError) as exc:
                log.warning("etcd discovery: %s; keeping %d workers", exc, len(self.known))
            except Exception:  # NOTE: discovery must never die; log and list again
                log.exception("etcd discovery failed; keeping %d workers", len(self.known))
            await asyncio.sleep(backoff)  # NOTE: back-off before listing again, not synchronisation
            backoff = min(backoff * 2, 5.0)


def make_discovery(url: str, interval_s: float = 5.0) -> DnsDiscovery | EtcdDiscovery:
    """`--discovery`: dns://NAME:PORT or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]."""
    if url.startswith("etcd://"):
        try:
            return EtcdDiscovery(url)
        except ValueError as exc:
            raise ValueError(f"--discovery {exc}") from None
    return DnsDiscovery(url, interval_s)

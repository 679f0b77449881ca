"""Where the workers are: a static list, or a DNS name resolved again and again.

DNS is how a Kubernetes headless service lists its pods (one A/AAAA record per ready pod):
`--discovery dns://NAME:PORT` resolves NAME every `--discovery-interval-s` and adds or removes
workers by the difference, so pods that come and go need no router restart.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

log = logging.getLogger("pdrouter.router.discovery")

Resolver = Callable[[str, int], Awaitable[set[str]]]


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

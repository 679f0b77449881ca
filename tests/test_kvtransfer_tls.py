"""KV transfer over mutual TLS: the same protocol byte for byte, and no bytes for a peer without
a certificate from the deployment's CA (none, another CA's, or plain TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest

from kvtransfer.errors import TransferError, TransferRefused
from kvtransfer.tcp import TcpTransferServer, TcpTransport
from kvtransfer.tls import client_context, server_context
from tests.certs import Cert, make_ca, make_cert
from tests.test_kvtransfer import BOUND_S, assert_copied, make_pool, make_registry, scattered, tcp_ref

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(d, "ca"), make_ca(d, "rogue-ca")
    return {
        "ca": ca,
        "server": make_cert(d, ca, "server"),
        "client": make_cert(d, ca, "client"),
        "rogue": make_cert(d, rogue_ca, "rogue"),
    }


@contextlib.asynccontextmanager
async def tls_server(src, reg, pki) -> AsyncIterator[TcpTransferServer]:
    ctx = server_context(pki["server"].cert, pki["server"].key, pki["ca"].cert)
    server = TcpTransferServer(src, reg, "127.0.0.1", 0, tls=ctx)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def client(dst, pki, who: str = "client") -> TcpTransport:
    return TcpTransport(dst, tls=client_context(pki["ca"].cert, pki[who].cert, pki[who].key), timeout_s=5)


@pytest.mark.parametrize("n", [1, 256])
async def test_tls_pull_byte_exact_and_control_calls(pki, n: int) -> None:
    with make_pool(seed=n) as src, make_pool() as dst:
        reg, unpinned, _ = make_registry()
        async with tls_server(src, reg, pki) as server:
            tcp = client(dst, pki)
            src_ids, dst_ids = scattered(n, n)
            h = reg.publish("r1", src_ids, n * 16)
            await asyncio.wait_for(tcp.pull(tcp_ref(server, h), src_ids, dst_ids), BOUND_S)
            assert_copied(src, dst, src_ids, dst_ids)
            assert await tcp.release(tcp_ref(server, h)) is True
            h2 = reg.publish("r2", [3, 4], 32)
            with pytest.raises(TransferRefused, match="wrong token"):
                await tcp.pull(tcp_ref(server, h2, token=bytes(16)), [3], [3])
            await tcp.claim(tcp_ref(server, h2))  # a refusal left the connection in step
            assert server.num_connections == 1  # one TLS connection, reused
            await tcp.close()
        assert unpinned == ["r1"]


async def test_tls_listener_refuses_peers_without_a_ca_certificate(pki) -> None:
    with make_pool(seed=3) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        async with tls_server(src, reg, pki) as server:
            h = reg.publish("r1", [0, 1], 32)
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.load_verify_locations(pki["ca"].cert)
            no_cert.check_hostname = False
            peers = {
                "plain tcp": TcpTransport(dst, timeout_s=5),
                "no certificate": TcpTransport(dst, tls=no_cert, timeout_s=5),
                "another CA": client(dst, pki, "rogue"),
            }
            for what, tcp in peers.items():
                with pytest.raises(TransferError) as info:
                    await asyncio.wait_for(tcp.pull(tcp_ref(server, h), [0, 1], [0, 1]), BOUND_S)
                assert not isinstance(info.value, TransferRefused), what  # no protocol reply at all
                await tcp.close()
            assert not dst.array.any()
            assert reg.num_pinned == 1 and reg.get("r1") is not None  # nobody spent the token
            good = client(dst, pki)
            await good.pull(tcp_ref(server, h), [0, 1], [0, 1])
            assert_copied(src, dst, [0, 1], [0, 1])
            await good.close()


async def test_tls_client_checks_the_listener_certificate(pki) -> None:
    """A puller trusting another CA refuses this listener (no token sent to an impostor)."""
    with make_pool(seed=4) as src, make_pool() as dst:
        reg, _, _ = make_registry()
        async with tls_server(src, reg, pki) as server:
            h = reg.publish("r1", [0], 16)
            rogue = pki["rogue"]
            tcp = TcpTransport(dst, tls=client_context(rogue.cert.replace("rogue", "rogue-ca"),
                                                       rogue.cert, rogue.key), timeout_s=5)  # fmt: skip
            with pytest.raises(TransferError, match="CERTIFICATE_VERIFY_FAILED"):
                await asyncio.wait_for(tcp.claim(tcp_ref(server, h)), BOUND_S)
            await tcp.close()
            assert reg.get("r1") is not None and reg.num_pinned == 1

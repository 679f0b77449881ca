"""TCP_NODELAY on accepted HTTP connections (Nagle + delayed ACK would add ~40 ms per response)."""

import asyncio
import socket

import pytest

from router.http_protocol import set_nodelay

pytestmark = pytest.mark.unit


async def test_set_nodelay_on_accepted_connection() -> None:
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # whatever the loop did
            set_nodelay(transport)
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Probe, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.read()
    writer.close()
    server.close()
    assert seen == [1]


async def test_router_http_server_sets_nodelay() -> None:
    """Start the router's uvicorn configuration for real and inspect the accepted socket."""
    import uvicorn

    from router.http_protocol import NoDelayHttpToolsProtocol
    from router.main import http_config

    accepted: list[int] = []

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class Recording(NoDelayHttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            accepted.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = http_config(app, "127.0.0.1", port)
    assert config.http is NoDelayHttpToolsProtocol
    config.http = Recording
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)  # server start poll
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()
    finally:
        server.should_exit = True
        await task
    assert accepted == [1]

"""The router's core, shared by `pdrouter router` and a worker's own HTTP API (`--http-port`).

Lifecycle: model dir -> tokenizer + limits -> worker pool + KV index -> route planner ->
orchestrator -> RouterState + HttpApp -> start the pool -> serve HTTP -> close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from router.http_api import HttpApp, RouterState
from router.http_protocol import NoDelayHttpToolsProtocol
from router.kv_index import KvIndex
from router.orchestrator import Orchestrator
from router.requests import Limits
from router.route_planner import RoutePlanner
from router.routing import DEFAULT_OVERLAP_WEIGHT, ActiveLoad
from router.tokenizer import Tokenizer
from router.worker_pool import WorkerClient, WorkerPool
from workers.tls import ChannelTls


def model_limits(model_dir: Path, served_name: str) -> Limits:
    cfg = json.loads((model_dir / "config.json").read_text())
    name = served_name or cfg.get("_name_or_path") or model_dir.name
    if "/" in name or os.sep in name:
        name = os.path.basename(name.rstrip("/"))
    return Limits(name, cfg.get("max_position_embeddings", 4096), cfg["vocab_size"])


def http_config(
    app, host: str, port: int, graceful_shutdown_s: float | None = None, tls: tuple[str, str] | None = None
) -> uvicorn.Config:
    """uvicorn's settings; `tls` (certificate, key) serves HTTPS."""
    cert, key = tls or (None, None)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",  # NOTE: we already run on uvloop
        http=NoDelayHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=graceful_shutdown_s,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )


@dataclass
class RouterApp:
    state: RouterState
    app: HttpApp
    pool: WorkerPool


PENDING_TTL_S = 10.0  # exact mode: until the worker's events arrive
APPROX_TTL_S = 120.0  # approx mode: how long a routed prompt is assumed cached


def build_router_app(
    model_dir: Path,
    worker_addresses: list[str],
    served_model_name: str = "",
    *,
    max_body_bytes: int = 8 << 20,
    prefill_policy: str = "kv",
    decode_policy: str = "kv",
    local_prefill_max_tokens: int = 512,
    session_affinity: bool = True,
    overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
    kv_index: str = "exact",
    migration_limit: int = 3,
    worker_tls: ChannelTls | None = None,
) -> RouterApp:
    """Everything between the HTTP/gRPC front ends and the workers; the caller starts the pool."""
    tokenizer = Tokenizer.from_dir(model_dir)
    index = KvIndex()
    active = ActiveLoad()

    def forget(w: WorkerClient) -> None:
        planner.index.remove_worker(w.worker_id)
        active.drop_worker(w.worker_id)

    # NOTE: approx: for workers that send no KV events; the router's own routes stand in, for 2 min
    approx = kv_index == "approx"
    on_event = None if approx else (lambda w, event: index.apply(w.worker_id, event))
    pool = WorkerPool(worker_addresses, on_event=on_event, on_down=forget, tls=worker_tls)
    planner = RoutePlanner(
        pool,
        index,
        active,
        prefill_policy=prefill_policy,
        decode_policy=decode_policy,
        local_prefill_max_tokens=local_prefill_max_tokens,
        session_affinity=session_affinity,
        overlap_weight=overlap_weight,
        pending_ttl_s=APPROX_TTL_S if approx else PENDING_TTL_S,
    )
    limits = model_limits(model_dir, served_model_name)
    state = RouterState(
        Orchestrator(planner, tokenizer, migration_limit=migration_limit), tokenizer, limits, max_body_bytes
    )
    return RouterApp(state, HttpApp(state), pool)


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind now (a taken port fails at start-up, not after the engine loads); listen when served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot bind HTTP {host}:{port}: {exc}") from None
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a process that owns its signals: it installs no handlers of its own."""

    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


class EmbeddedHttp:
    """A RouterApp's HTTP API served as a task of the running loop: start -> ready -> stop."""

    def __init__(self, router: RouterApp, sock: socket.socket, graceful_shutdown_s: float = 5.0) -> None:
        self.router = router
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.server = _EmbeddedServer(http_config(router.app, host, port, graceful_shutdown_s))
        self._task: asyncio.Task | None = None

    async def start(self, ready_timeout: float) -> None:
        """Serve, and return once the pool sees a healthy worker (GET /ready answers 200)."""
        self.router.pool.start()
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")
        ready = asyncio.create_task(self.router.pool.wait_ready(ready_timeout))
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            raise RuntimeError(f"HTTP server stopped at start-up: {self._task.exception()!r}")
        await ready  # NOTE: raises TimeoutError when the pool never saw its worker

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        else:
            self.sock.close()
        await self.router.pool.close()

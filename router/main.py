"""`pdrouter router`: args -> tokenizer, worker pool, orchestrator -> HTTP + gRPC servers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdrouter_proto import inference_pb2, inference_pb2_grpc
from router.admission import Admission
from router.app import _EmbeddedServer, build_router_app, http_config
from router.auth import ApiKeys, add_api_key_flags
from router.grpc_api import InferenceService
from router.http_api import RouterState
from router.routing import DEFAULT_OVERLAP_WEIGHT, POLICY_NAMES
from workers.config import parse_args
from workers.model_files import resolve_model
from workers.tls import all_or_none, channel_tls, server_credentials

log = logging.getLogger("pdrouter.router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdrouter router", description="Run the router (OpenAI HTTP + gRPC).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC Inference port")
    p.add_argument(
        "--worker", action="append", default=[], metavar="HOST:PORT", help="a worker's gRPC address"
    )
    p.add_argument(
        "--discovery",
        default="static",
        help="static (the --worker list), dns://NAME:PORT (e.g. a Kubernetes headless service) or "
        "etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (workers run with --register; default prefix "
        "/pdrouter/workers/)",
    )
    p.add_argument("--discovery-interval-s", type=float, default=5.0, help="dns: re-resolve period")
    p.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF directory"
    )
    p.add_argument("--served-model-name", default="", help="model id clients use (default: the model's name)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument(
        "--prefill-policy", choices=POLICY_NAMES, default="kv", help="routing policy of the prefill pool"
    )
    p.add_argument(
        "--decode-policy", choices=POLICY_NAMES, default="kv", help="routing policy of the decode pool"
    )
    p.add_argument(
        "--ready-min-workers",
        type=int,
        default=1,
        help="at start-up, GET /ready waits until this many workers are healthy (after that it needs "
        "a healthy decode worker only)",
    )
    p.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=512,
        help="the decode worker prefills locally (aggregated) when it would compute at most this many tokens",
    )
    p.add_argument(
        "--kv-overlap-weight",
        type=float,
        default=DEFAULT_OVERLAP_WEIGHT,
        help="kv policy: weight of prefill work against KV blocks in use (higher: stick to cached prefixes)",
    )
    p.add_argument(
        "--kv-index",
        choices=["exact", "approx"],
        default="exact",
        help="exact: from the workers' KV events; approx: from this router's own routes (no events)",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=3,
        help="times a broken decode stream is resumed on another worker (0: never)",
    )
    p.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        default=60.0,
        help="a decode stream silent this long is broken: migrated, or failed with a clear error",
    )
    p.add_argument(
        "--trace-every-nth-token",
        type=int,
        default=1,
        help="tracing: a span event for every Nth token (1: every token; the last one always)",
    )
    p.add_argument("--no-session-affinity", action="store_true", help="ignore the x-session-id header")
    add_api_key_flags(p, "/v1/*, /debug/* and gRPC Inference")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="generation requests at once; more wait in the queue (0: no limit)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=256,
        help="requests waiting for --max-in-flight; beyond it 429 / RESOURCE_EXHAUSTED at once",
    )
    p.add_argument(
        "--queue-timeout-s",
        type=float,
        default=10.0,
        help="a queued request waits at most this long, then 429 / RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: /ready 503 and new requests refused, then streams in flight get this long",
    )
    p.add_argument("--tls-cert", default="", help="serve HTTPS and gRPC over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", default="", help="the private key of --tls-cert (PEM)")
    p.add_argument("--worker-tls-ca", default="", help="mutual TLS to workers: the CA of their certificates")
    p.add_argument(
        "--worker-tls-cert", default="", help="mutual TLS to workers: the router's client certificate"
    )
    p.add_argument("--worker-tls-key", default="", help="mutual TLS to workers: its private key")
    p.add_argument(
        "--worker-tls-server-name",
        default="",
        help="mutual TLS to workers: the name their certificates carry (default: the address dialled)",
    )
    return p


async def serve(args: argparse.Namespace) -> None:
    if not args.worker and args.discovery == "static":
        raise SystemExit(
            "pdrouter router: give at least one --worker HOST:PORT, or --discovery dns://NAME:PORT "
            "or etcd://HOST:PORT/PREFIX"
        )
    api_keys = ApiKeys.load(args.api_key, args.api_key_file)
    public_tls = (args.tls_cert, args.tls_key) if all_or_none(args, "tls_cert", "tls_key") else None
    worker_tls = None
    if all_or_none(args, "worker_tls_ca", "worker_tls_cert", "worker_tls_key"):
        worker_tls = channel_tls(
            args.worker_tls_ca, args.worker_tls_cert, args.worker_tls_key, args.worker_tls_server_name
        )
    model_dir = resolve_model(args.model)
    core = build_router_app(
        model_dir,
        args.worker,
        args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        session_affinity=not args.no_session_affinity,
        overlap_weight=args.kv_overlap_weight,
        kv_index=args.kv_index,
        migration_limit=args.migration_limit,
        worker_tls=worker_tls,
    )
    state, limits, pool = core.state, core.state.limits, core.pool
    state.trace_every_nth_token = max(1, args.trace_every_nth_token)
    state.ready_min_workers = max(1, args.ready_min_workers)
    state.orchestrator.idle_timeout_s = args.stream_idle_timeout_s
    state.api_keys = api_keys
    state.admission = Admission(max(0, args.max_in_flight), max(0, args.max_queued), args.queue_timeout_s)
    pool.start()
    discovery = None
    if args.discovery != "static":
        from router.discovery import make_discovery

        try:
            source = make_discovery(args.discovery, args.discovery_interval_s)
        except ValueError as exc:
            raise SystemExit(f"pdrouter router: {exc}") from None
        discovery = asyncio.create_task(source.run(pool.add, pool.remove), name="discovery")

    grpc_server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(state), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    service_name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    address = f"{args.host}:{args.grpc_port}"
    if public_tls is not None:
        bound = grpc_server.add_secure_port(address, server_credentials(*public_tls))
    else:
        bound = grpc_server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"cannot bind gRPC {args.host}:{args.grpc_port}")
    await grpc_server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)

    server = _EmbeddedServer(http_config(core.app, args.host, args.port, 1.0, public_tls))
    http = asyncio.create_task(server.serve(), name="http")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"pdrouter router: {'https' if public_tls else 'http'}://{args.host}:{args.port}/v1  "
        f"grpc{'+tls' if public_tls else ''} {args.host}:{args.grpc_port}  "
        f"model={limits.model_name}  workers={','.join(args.worker)}",
        flush=True,
    )
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({http, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if http.done():
            http.result()  # NOTE: the HTTP server could not start (e.g. the port is taken)
            raise SystemExit(f"pdrouter router: HTTP server on {args.host}:{args.port} stopped")
        await drain(state, health_servicer, service_name, args.drain_seconds)
    finally:
        stopping.cancel()
        server.should_exit = True
        await asyncio.gather(http, return_exceptions=True)
        await health_servicer.enter_graceful_shutdown()
        await grpc_server.stop(1)
        if discovery is not None:
            discovery.cancel()
        await pool.close()


async def drain(
    state: RouterState, health_servicer: health.aio.HealthServicer, service_name: str, seconds: float
) -> None:
    """SIGTERM: readiness off (GET /ready 503, gRPC health NOT_SERVING), new requests refused
    with 503 / UNAVAILABLE, streams in flight finish within `seconds`; the caller then stops."""
    await health_servicer.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("draining: waiting up to %.0f s for %d requests in flight", seconds, state.num_active)
    if not await state.admission.drain(seconds):
        log.warning(
            "drain time (%.0f s) is over with %d requests in flight; stopping", seconds, state.num_active
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, "router")
    from workers.telemetry import run_service

    run_service("pdrouter-router", serve(args))

"""`pdrouter worker`: args -> engine -> gRPC Worker service (+ health, reflection) -> serve,
and with --http-port the OpenAI HTTP API too (a router over just this worker)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtransfer.registry import CHOICES
from pdrouter_proto import worker_pb2, worker_pb2_grpc
from workers.config import parse_args
from workers.engine.engine import Engine
from workers.engine.runner import spec_from_model_dir
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import SamplingParams
from workers.etcd import parse_etcd_url
from workers.kv_agent import KvAgent
from workers.mock.runner import MockRunner, TimingModel
from workers.model_files import resolve_model
from workers.registration import Registration, WorkerRecord
from workers.service import VERSION, WorkerService
from workers.tls import all_or_none, channel_tls, kv_contexts, server_credentials

if TYPE_CHECKING:
    from router.app import EmbeddedHttp

log = logging.getLogger("pdrouter.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdrouter worker", description="Run one worker (gRPC Worker service).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061, help="gRPC port")
    p.add_argument("--role", choices=["both", "prefill", "decode"], default="both")
    p.add_argument("--engine", choices=["hf", "mock"], default="hf")
    p.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF directory"
    )
    p.add_argument("--worker-id", default="", help="defaults to HOST:PORT")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--dtype", default=None, help="float32/float16/bfloat16 (default: float32 on CPU, bf16 on CUDA)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: cores / workers on this host)"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=0, help="KV pool size in blocks (0: from --kv-cache-mb)")
    p.add_argument(
        "--kv-cache-mb",
        type=int,
        default=0,
        help="KV pool size in MiB (0: on CUDA half the memory free after the weights; on CPU room "
        "for 2 full-context sequences, at least 512)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--max-batched-tokens", type=int, default=512, help="per-step token budget (chunked prefill)"
    )
    p.add_argument("--mock-token-delay-ms", type=float, default=0.0, help="mock: fixed time per decode step")
    p.add_argument(
        "--mock-timing",
        default="",
        help="mock: 'a,b,c,d,e,f' of prefill ms = a+b*n+c*n^2 and decode step ms = d+e*batch+f*context, "
        "or the JSON file pdrouter calibrate writes",
    )
    p.add_argument("--mock-num-blocks", type=int, default=4096)
    p.add_argument(
        "--kv-transfer",
        choices=list(CHOICES),
        default="auto",
        help="how this worker pulls KV from prefill workers (auto, per handle: cuda_ipc on one node, "
        "shm on one host, nixl when installed, staged for GPU pools, else tcp; docs/kvtransfer.md)",
    )
    p.add_argument("--kv-transfer-host", default="", help="KV transfer listener address (default: --host)")
    p.add_argument("--kv-transfer-port", type=int, default=0, help="KV transfer listener port (0: any free)")
    p.add_argument(
        "--kv-handle-ttl-s", type=float, default=30.0, help="unpin published KV blocks after this long"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="mock: run N workers in this process on ports PORT..PORT+N-1",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="also serve the OpenAI HTTP API on this port (0: off; N workers use HTTP_PORT..HTTP_PORT+N-1)",
    )
    p.add_argument(
        "--served-model-name", default="", help="model id of the HTTP API (default: the model's name)"
    )
    from router.auth import add_api_key_flags  # NOTE: light (msgspec), unlike the rest of the router

    add_api_key_flags(p, "the HTTP API (--http-port)")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=0,
        help="refuse new requests (RESOURCE_EXHAUSTED) while N wait (0: no limit)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus /metrics on this port (0: off; one for all)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: refuse new work, then give requests in flight this long to finish",
    )
    p.add_argument(
        "--register",
        default="",
        metavar="etcd://HOST:PORT[/PREFIX]",
        help="once ready, put this worker under PREFIX (default /pdrouter/workers/) in etcd with a "
        "lease, for routers run with --discovery etcd://...; revoked at SIGTERM",
    )
    p.add_argument(
        "--register-ttl-s", type=int, default=10, help="etcd lease TTL: a dead worker is dropped after it"
    )
    p.add_argument(
        "--advertise-host",
        default="",
        help="the host routers dial, as registered in etcd (default: --host; needed when --host is 0.0.0.0)",
    )
    p.add_argument("--tls-cert", default="", help="mutual TLS: this worker's certificate (PEM; gRPC and KV)")
    p.add_argument("--tls-key", default="", help="mutual TLS: its private key (PEM)")
    p.add_argument(
        "--tls-client-ca",
        default="",
        help="mutual TLS: the CA that signs the router's and the other workers' certificates; "
        "required of every client of the gRPC port and the KV transfer listener",
    )
    return p


def parse_timing(text: str, token_delay_ms: float) -> TimingModel:
    """'' -> a fixed decode delay; 'a,b,c,d,e,f'; or the JSON file written by `pdrouter calibrate`."""
    if not text:
        return TimingModel(d=token_delay_ms)
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        import msgspec  # NOTE: loaded already (TimingModel is a msgspec struct)

        try:
            with open(path, "rb") as fh:
                return msgspec.json.decode(fh.read(), type=TimingModel)
        except msgspec.DecodeError as exc:
            raise SystemExit(f"--mock-timing {text}: not a timing model JSON file ({exc})") from exc
    try:
        a, b, c, d, e, f = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise SystemExit(
            f"--mock-timing wants six comma-separated numbers a,b,c,d,e,f or a JSON file; got {text!r}"
        ) from exc
    return TimingModel(a=a, b=b, c=c, d=d, e=e, f=f)


def build_engine(args: argparse.Namespace) -> Engine:
    model_dir = resolve_model(args.model)
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens)
    if args.engine == "mock":
        spec = spec_from_model_dir(model_dir, block_size=args.block_size)
        runner = MockRunner(
            spec,
            args.num_blocks or args.mock_num_blocks,
            parse_timing(args.mock_timing, args.mock_token_delay_ms),
            shared_kv=args.role != "decode",
        )
        return Engine(runner, sched)
    from workers.engine.model_runner import ModelRunner

    runner = ModelRunner(
        model_dir,
        num_blocks=args.num_blocks or None,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        kv_cache_bytes=(args.kv_cache_mb << 20) or None,
        threads=args.threads or max(1, os.cpu_count() or 1),
        shared_kv=args.role != "decode",  # NOTE: only a prefill side is read through shared memory
    )
    return Engine(runner, sched)


async def warm_up(engine: Engine) -> None:
    """One tiny request before readiness, so one-time setup stays out of the first user's TTFT.
    Shorter than a block: it leaves nothing in the prefix cache and emits no KV events."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate("warmup", [1] * (engine.block_manager.block_size // 2), params):
        pass


def _dial_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class WorkerInstance:
    """One worker: gRPC server (Worker + health + reflection), once loaded its engine, and
    optionally its own HTTP API (started after the engine, stopped before the gRPC server)."""

    def __init__(self, args: argparse.Namespace, port: int, worker_id: str, http_port: int = 0) -> None:
        self.args = args
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
        reflection.enable_server_reflection(
            (self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.tls = all_or_none(args, "tls_cert", "tls_key", "tls_client_ca")
        if self.tls:
            creds = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
            self.port = self.server.add_secure_port(f"{args.host}:{port}", creds)
        else:
            self.port = self.server.add_insecure_port(f"{args.host}:{port}")
        if self.port == 0:
            raise SystemExit(f"cannot bind {args.host}:{port}")
        self.worker_id = worker_id or f"{args.host}:{self.port}"
        self.service = WorkerService(worker_id=self.worker_id, role=args.role, engine_kind=args.engine)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.service, self.server)
        self.engine: Engine | None = None
        self.kv: KvAgent | None = None
        self.http_port = http_port
        self.http: EmbeddedHttp | None = None
        self.http_sock: socket.socket | None = None
        if http_port:
            from router.app import bind_tcp  # NOTE: only a worker serving HTTP imports the router
            from router.auth import ApiKeys

            self.api_keys = ApiKeys.load(args.api_key, args.api_key_file)
            self.http_sock = bind_tcp(args.host, http_port)

    async def start(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(self.service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def load(self) -> None:
        """Readiness is NOT_SERVING until the engine is loaded and warmed up."""
        self.engine = await asyncio.to_thread(build_engine, self.args)
        self.engine.max_waiting = self.args.max_waiting
        self.engine.start()
        await warm_up(self.engine)
        if self.engine.runner.transfer_pool is not None:
            a = self.args
            self.kv = KvAgent.create(
                self.engine, self.worker_id, VERSION, a.kv_transfer_host or a.host, a.kv_transfer_port,
                backend=a.kv_transfer, ttl_s=a.kv_handle_ttl_s,
                tls=kv_contexts(a.tls_cert, a.tls_key, a.tls_client_ca) if self.tls else None,
            )  # fmt: skip
            await self.kv.start()
        self.service.attach(self.engine, self.kv)
        await self.health.set(self.service_name, health_pb2.HealthCheckResponse.SERVING)

    async def start_http(self, ready_timeout: float = 30.0) -> None:
        """A router over exactly this worker (same validation, errors, SSE, usage and headers)."""
        from router.app import EmbeddedHttp, build_router_app

        model_dir = resolve_model(self.args.model)
        a = self.args
        tls = channel_tls(a.tls_client_ca, a.tls_cert, a.tls_key) if self.tls else None
        core = build_router_app(
            model_dir, [f"{_dial_host(a.host)}:{self.port}"], a.served_model_name, worker_tls=tls
        )
        core.state.api_keys = self.api_keys
        self.http = EmbeddedHttp(core, self.http_sock)
        await self.http.start(ready_timeout)

    async def drain(self, seconds: float) -> None:
        """SIGTERM, before stop(): readiness NOT_SERVING, new Prefill/Decode refused with UNAVAILABLE
        (the router fails them over), the router's event stream ended (it marks this worker
        unhealthy); calls in flight and KV handles pinned for decode workers get `seconds`."""
        await self.health.set(self.service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            self.http.router.state.admission.draining = True
        self.service.drain()
        try:
            async with asyncio.timeout(seconds):
                while self.service.busy():
                    await asyncio.sleep(0.05)  # NOTE: a poll, and only while shutting down
        except TimeoutError:
            log.warning(
                "worker %s: drain time (%.0f s) is over with %d calls in flight; stopping",
                self.worker_id, seconds, self.service.num_active,
            )  # fmt: skip

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        elif self.http_sock is not None:
            self.http_sock.close()
        await self.server.stop(grace)
        if self.kv is not None:
            await self.kv.close()
        if self.engine is not None:
            self.engine.stop()


def advertised_host(args: argparse.Namespace) -> str:
    """The host in this worker's etcd record; a --register that cannot work stops the start."""
    host = args.advertise_host or args.host
    if args.register:
        if host in ("", "0.0.0.0", "::"):
            raise SystemExit("--register with a wildcard --host needs --advertise-host (what routers dial)")
        try:
            parse_etcd_url(args.register)
        except ValueError as exc:
            raise SystemExit(f"--register {exc}") from None
    return _dial_host(host)


def record(inst: WorkerInstance, host: str) -> WorkerRecord:
    a = inst.args
    model = inst.engine.spec.name if inst.engine else ""
    return WorkerRecord(
        address=f"{host}:{inst.port}", worker_id=inst.worker_id, role=a.role, model=model, engine=a.engine,
        version=VERSION,
    )  # fmt: skip


def register(args: argparse.Namespace, instances: list[WorkerInstance]) -> Registration | None:
    """--register: every instance under one etcd lease, kept alive in the background."""
    if not args.register:
        return None
    host = advertised_host(args)
    records = [record(inst, host) for inst in instances]
    registration = Registration(args.register, records, args.register_ttl_s)
    registration.start()
    return registration


async def serve(args: argparse.Namespace) -> None:
    n = max(1, args.num_workers)
    if n > 1 and args.engine != "mock":
        raise SystemExit("--num-workers > 1 is for the mock engine (many simulated workers in one process)")
    if args.http_port and args.role == "prefill":
        raise SystemExit("--http-port serves whole requests: use it with --role both or decode")
    advertised_host(args)  # NOTE: a bad --register setup fails at start, not after the model loads
    instances = []
    for i in range(n):
        port = args.port + i if args.port else 0
        http_port = args.http_port + i if args.http_port else 0
        instances.append(WorkerInstance(args, port, args.worker_id if n == 1 else "", http_port))
    for inst in instances:
        await inst.start()
        print(f"pdrouter worker listening {inst.worker_id}", flush=True)
    await asyncio.gather(*(inst.load() for inst in instances))
    for inst in instances:
        model = inst.engine.spec.name if inst.engine else "?"
        print(f"pdrouter worker {inst.worker_id} ready ({args.engine}, {args.role}, {model})", flush=True)
    if args.metrics_port:
        from workers.metrics import WorkerCollector, serve_metrics

        collectors = [WorkerCollector(i.worker_id, i.engine, i.kv) for i in instances if i.engine is not None]
        serve_metrics(args.host, args.metrics_port, collectors)
        print(f"pdrouter worker metrics http://{args.host}:{args.metrics_port}/metrics", flush=True)
    await asyncio.gather(*(inst.start_http() for inst in instances if inst.http_port))
    for inst in instances:
        if inst.http_port:
            print(
                f"pdrouter worker {args.host}:{inst.port} http http://{args.host}:{inst.http_port}/v1",
                flush=True,
            )

    registration = register(args, instances)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if registration is not None:
        await registration.close()  # NOTE: first: routers stop sending new work at once
    await asyncio.gather(*(inst.drain(args.drain_seconds) for inst in instances))
    await asyncio.gather(*(inst.stop() for inst in instances))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, "worker")
    from workers.telemetry import run_service

    run_service("pdrouter-worker", serve(args))

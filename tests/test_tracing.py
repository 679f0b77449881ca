"""Tracing across router and workers, into a real OTLP/gRPC receiver; timelines and `pdrouter trace`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.kv_helpers import route_workers
from tests.procs import ROOT, Stack, free_port, free_port_run

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                service = f"{res.get('service.name', '')}@{res.get('service.instance.id', '')}"
                for ss in rs.scope_spans:
                    self.spans.extend((service, span) for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    c.port = port  # type: ignore[attr-defined]
    yield c
    server.stop(0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir, collector):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    s = Stack(
        tmp_path_factory.mktemp("tracing"),
        "--prefill", "1", "--decode", "1",
        "--worker-arg=--mock-timing=2,0.05,0,3,0.1,0",
        "--router-arg=--local-prefill-max-tokens=16",
        env=env,
    )  # fmt: skip
    yield s
    s.stop()


def _chat(
    stack: Stack, request_id: str, max_tokens: int, traceparent: str | None = None, stream: bool = True
):
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    headers = {"x-request-id": request_id}
    if traceparent:
        headers["traceparent"] = traceparent
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": f"{request_id}: " + " ".join(f"topic{i}" for i in range(40))}],
        max_tokens=max_tokens, stream=stream, extra_body={"ignore_eos": True}, extra_headers=headers,
    )  # fmt: skip
    body = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
        return raw.headers, text
    return raw.headers, body.choices[0].message.content


def _wait_spans(collector: Collector, trace_id: str, check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        spans = collector.of_trace(trace_id)
        if check(spans):
            return spans
        if time.monotonic() > deadline:
            names = sorted((svc.split("@")[0], s.name) for svc, s in spans)
            raise TimeoutError(f"spans of {trace_id} incomplete after {timeout} s: {names}")
        time.sleep(0.05)  # poll the receiver


def test_one_trace_across_three_processes_with_a_token_event_per_token(stack, collector) -> None:
    tokens = 6
    headers, _ = _chat(stack, "trace-1", tokens, f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
    assert route_workers(headers["x-pdrouter-route"])["mode"] == "disaggregated"

    def complete(spans) -> bool:
        names = {(svc.split("@")[0], s.name) for svc, s in spans}
        return {("pdrouter-router", "request"), ("pdrouter-worker", "prefill"),
                ("pdrouter-worker", "decode"), ("pdrouter-worker", "kv_transfer")} <= names  # fmt: skip

    spans = _wait_spans(collector, CALLER_TRACE, complete)
    by_name = {s.name: s for _, s in spans}
    root = by_name["request"]
    assert root.parent_span_id.hex() == CALLER_SPAN  # the caller's traceparent is the parent
    assert sum(1 for e in root.events if e.name == "token") == tokens
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["gen_ai.request.model"].string_value == "SmolLM2-135M-Instruct"
    assert attrs["gen_ai.usage.output_tokens"].int_value == tokens
    assert attrs["pdrouter.mode"].string_value == "disaggregated"
    assert attrs["pdrouter.ttft_ms"].double_value > 0
    assert {"tokenize", "route"} <= set(by_name)
    # worker spans hang under the router's client spans: one trace, parent links intact
    ids = {s.span_id for _, s in spans}
    for name in ("prefill", "decode", "kv_transfer", "tokenize", "route"):
        assert by_name[name].parent_span_id in ids, name
    processes = {svc for svc, _ in spans}  # router, prefill worker, decode worker
    assert len(processes) == 3 and {p.split("@")[0] for p in processes} == {
        "pdrouter-router",
        "pdrouter-worker",
    }
    transfer = {a.key: a.value for a in by_name["kv_transfer"].attributes}
    assert transfer["pdrouter.kv.blocks"].int_value >= 1 and transfer["pdrouter.kv.backend"].string_value


def test_a_200_token_answer_exports_200_token_events(stack, collector) -> None:
    """Past the SDK's default of 128 events per span: every token, the first one included."""
    trace_id = "5c0ffee0000000000000000000000200"
    _chat(stack, "trace-200", 200, f"00-{trace_id}-{CALLER_SPAN}-01")
    spans = _wait_spans(collector, trace_id, lambda s: any(x.name == "request" for _, x in s))
    root = next(s for _, s in spans if s.name == "request")
    events = [e for e in root.events if e.name == "token"]
    assert len(events) == 200 and root.dropped_events_count == 0
    times = [e.time_unix_nano for e in events]
    assert times == sorted(times) and times[0] >= root.start_time_unix_nano


def test_timeline_stages_add_up_to_ttft_and_trace_cli_renders(stack) -> None:
    _chat(stack, "trace-2", 5)
    with urllib.request.urlopen(stack.base_url + "/debug/requests/trace-2", timeout=10) as r:
        tl = json.loads(r.read())
    ttft_stages = [s for s in tl["stages"] if s["name"] != "decode"]
    assert [s["name"] for s in ttft_stages] == ["receive", "tokenize", "route", "prefill", "delivery"]
    for a, b in itertools.pairwise(ttft_stages):
        assert a["end_ms"] == b["start_ms"]  # contiguous
    assert abs(sum(s["end_ms"] - s["start_ms"] for s in ttft_stages) - tl["ttft_ms"]) < 1.0
    assert len(tl["tokens_ms"]) == 5 and tl["worker"]["prefill_compute_ms"] > 0
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "trace", "trace-2", "--url", stack.base_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "TTFT" in out.stdout and "where TTFT went" in out.stdout and "worker compute" in out.stdout
    slow = subprocess.run(
        [sys.executable, "-m", "router.cli", "trace", "--slowest", "3", "--url", stack.base_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert slow.returncode == 0 and "trace-2" in slow.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "router.cli", "trace", "no-such", "--url", stack.base_url],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode != 0 and "No recent request" in missing.stderr


def test_response_id_is_an_alias_and_bad_queries_are_400(stack) -> None:
    _, _ = _chat(stack, "trace-3", 2, stream=False)
    with urllib.request.urlopen(stack.base_url + "/debug/requests/trace-3", timeout=10) as r:
        alias = json.loads(r.read())["aliases"][0]
    with urllib.request.urlopen(stack.base_url + f"/debug/requests/{alias}", timeout=10) as r:
        assert json.loads(r.read())["request_id"] == "trace-3"
    try:
        urllib.request.urlopen(stack.base_url + "/debug/requests?slowest=abc", timeout=10)
        raise AssertionError("expected 400")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and json.loads(e.read())["error"]["param"] == "slowest"


def test_worker_metrics_endpoint(tmp_path, default_model_dir) -> None:
    from tests.procs import Proc, pdrouter, wait_http_ok

    port, metrics = free_port_run(2), free_port()
    while metrics in (port, port + 1):  # NOTE: the second worker takes port + 1
        metrics = free_port()
    proc = Proc(
        pdrouter("worker", "--engine", "mock", "--num-workers", "2", "--port", str(port),
                 "--metrics-port", str(metrics)),
        tmp_path / "worker.log",
    )  # fmt: skip
    try:
        wait_http_ok(f"http://127.0.0.1:{metrics}/metrics", proc, 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        for name in ("requests_running", "kv_blocks_total", "prefix_hit_tokens_total", "kv_handles_pinned"):
            assert text.count(f"pdrouter_worker_{name}{{") == 2, name  # one sample per worker
    finally:
        proc.stop()

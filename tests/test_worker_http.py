"""`pdrouter worker --http-port`: the official openai client against a worker directly, no router."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests import prom
from tests.procs import Proc, free_port, pdrouter

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Worker:
    """A mock worker process with its HTTP API on HTTP_PORT.. (one per simulated worker)."""

    def __init__(self, tmp: Path, *extra: str, num_workers: int = 1) -> None:
        if num_workers == 1:
            self.port, self.http_port = free_port(), free_port()
        else:  # NOTE: instance i listens on PORT+i (gRPC) and HTTP_PORT+i
            self.port = _free_run(2 * num_workers)
            self.http_port = self.port + num_workers
        argv = pdrouter(
            "worker", "--engine", "mock", "--mock-token-delay-ms", "1", "--port", str(self.port),
            "--http-port", str(self.http_port), "--num-workers", str(num_workers), *extra,
        )  # fmt: skip
        self.proc = Proc(argv, tmp / f"worker-{self.port}.log")
        self.num_workers = num_workers

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.http_port + i}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every instance printed its HTTP line (printed once its HTTP API is routable)."""
        lines = [
            f"pdrouter worker 127.0.0.1:{self.port + i} http {self.url(i)}/v1\n"
            for i in range(self.num_workers)
        ]
        deadline = time.monotonic() + timeout
        while not all(line in self.proc.log() for line in lines):
            if not self.proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker not ready (alive={self.proc.alive()}):\n{self.proc.log()[-4000:]}"
                )
            time.sleep(0.05)  # log poll interval

    def client(self, i: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(i) + "/v1", api_key="unused", max_retries=0, timeout=30)


def _free_run(n: int) -> int:
    """A port P with P..P+n-1 all free right now."""
    for _ in range(50):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {n} free ports")


def _request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    w = Worker(tmp_path_factory.mktemp("worker_http"))
    try:
        w.wait_ready()
        yield w
    finally:
        w.proc.stop()


@pytest.fixture(scope="module")
def client(worker: Worker) -> openai.OpenAI:
    return worker.client()


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_non_streaming_usage(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_streaming_with_usage_matches_non_streaming(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, seed=5)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_and_not(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 4
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_headers_request_id_and_route(worker) -> None:
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 2}).encode()
    url = worker.url() + "/v1/chat/completions"
    status, headers, _ = _request(url, body, {"x-request-id": "abc123"})
    assert status == 200 and headers["x-request-id"] == "abc123"
    assert headers["x-pdrouter-route"] == f"mode=aggregated;decode=127.0.0.1:{worker.port}"
    status, headers, _ = _request(url, b"{")
    assert status == 400 and headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages", "empty_array"),
        (json.dumps({"model": "nope", "messages": CHAT}).encode(), 404, "model", "model_not_found"),
        (json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": "x"}).encode(), 400, "max_tokens",
         "invalid_type"),
    ],
)  # fmt: skip
def test_bad_request_gets_openai_error(worker, body, status, param, code) -> None:
    got, _, raw = _request(worker.url() + "/v1/chat/completions", body)
    payload = json.loads(raw)
    assert got == status
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param and payload["error"]["code"] == code


def test_openai_client_raises_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0)


def test_health_ready_metrics(worker) -> None:
    """/metrics counts exactly the requests this test sends, by endpoint, status and mode, and
    their tokens; the worker it serves from shows healthy."""
    for path in ("/health", "/ready"):
        assert _request(worker.url() + path)[0] == 200
    chat = "/v1/chat/completions"
    ok = {"endpoint": chat, "status": "200", "mode": "aggregated"}
    bad = {"endpoint": chat, "status": "400", "mode": "none"}  # refused before any route
    before = prom.scrape(worker.url() + "/metrics")
    for _ in range(3):
        body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 4}).encode()
        assert _request(worker.url() + chat, body)[0] == 200
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 0}).encode()
    assert _request(worker.url() + chat, body)[0] == 400
    status, _, raw = _request(worker.url() + "/metrics")
    after = raw.decode()
    assert status == 200

    def moved(name: str, **labels: str) -> float:
        return prom.value(after, name, **labels) - prom.value(before, name, **labels)

    assert moved("pdrouter_requests_total", **ok) == 3
    assert moved("pdrouter_requests_total", **bad) == 1
    assert moved("pdrouter_output_tokens_total") == 3 * 4
    assert moved("pdrouter_routing_decisions_total", mode="aggregated") == 3
    worker_id = f"127.0.0.1:{worker.port}"
    assert prom.samples(after, "pdrouter_worker_healthy") == {
        frozenset({"role": "both", "worker": worker_id}.items()): 1.0
    }


def test_two_workers_two_http_ports(tmp_path: Path, default_model_dir: Path) -> None:
    w = Worker(tmp_path, num_workers=2)
    try:
        w.wait_ready()
        for i in range(2):
            body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 3}).encode()
            status, headers, raw = _request(w.url(i) + "/v1/chat/completions", body)
            assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
            assert headers["x-pdrouter-route"] == f"mode=aggregated;decode=127.0.0.1:{w.port + i}"
            assert [m.id for m in w.client(i).models.list().data] == [MODEL]
    finally:
        code = w.proc.stop()
    assert code == 0, w.proc.log()[-4000:]
    assert "Traceback" not in w.proc.log()


def test_prefill_role_refuses_http(tmp_path: Path) -> None:
    w = Worker(tmp_path, "--role", "prefill")
    try:
        assert w.proc.proc.wait(timeout=30) != 0
    finally:
        w.proc.stop()
    assert "--http-port serves whole requests" in w.proc.log()


def test_taken_http_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        argv = pdrouter(
            "worker", "--engine", "mock", "--port", str(free_port()), "--http-port", str(http_port)
        )
        proc = Proc(argv, tmp_path / "taken.log")
        try:
            assert proc.proc.wait(timeout=30) != 0
        finally:
            proc.stop()
    assert f"cannot bind HTTP 127.0.0.1:{http_port}" in proc.log()

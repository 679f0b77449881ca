"""Router replicas: two routers over the same workers share nothing, yet both route by KV.

Each router builds its own KV index from every worker's event stream. A prompt sent through
router A is cached on the worker A chose; the same long prefix sent through router B (which has
never seen it) goes to that worker too, because B heard the worker's KV events. And back."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.kv_helpers import route_workers, wait_for
from tests.procs import Proc, free_port, pdrouter, wait_http_ok

pytestmark = pytest.mark.integration


def _doc(i: int, tag: str) -> str:
    # NOTE: raw completions (no chat template, whose system prompt every chat request shares):
    # documents differ from the first block on, so for a new one the workers tie
    return f"{i} {tag}: " + " ".join(f"w{i}x{j}" for j in range(100))  # ~40 blocks of 16 tokens


def _ask(base: str, doc: str, question: str) -> tuple[str, int]:
    """(decode worker, cached prompt tokens) of one completion through the router at `base`."""
    body = {"model": "default", "max_tokens": 2, "temperature": 0, "prompt": f"{doc}\n{question}"}
    req = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        decode = route_workers(r.headers["x-pdrouter-route"])["decode"]
        usage = json.loads(r.read())["usage"]
    return decode, usage["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture
def replicas(tmp_path, default_model_dir):
    model = str(default_model_dir)
    procs: list[Proc] = []
    workers = []
    try:
        for _ in range(2):
            port = free_port()
            workers.append(f"127.0.0.1:{port}")
            procs.append(Proc(
                pdrouter("worker", "--engine", "mock", "--port", str(port), "--model", model,
                         "--mock-token-delay-ms", "1"),
                tmp_path / f"worker-{port}.log",
            ))  # fmt: skip
        bases = []
        for name in "ab":
            hport = free_port()
            argv = pdrouter("router", "--port", str(hport), "--grpc-port", str(free_port()),
                            "--model", model, "--decode-policy", "kv",
                            "--worker", workers[0], "--worker", workers[1])  # fmt: skip
            router = Proc(argv, tmp_path / f"router-{name}.log")
            procs.append(router)
            bases.append(f"http://127.0.0.1:{hport}")
            wait_http_ok(bases[-1] + "/ready", router, 60)
            for w in workers:
                wait_for(
                    lambda r=router, w=w: f"worker {w} is healthy" in r.log(), 30, f"router {name} sees {w}"
                )
        yield bases, workers
    finally:
        for p in procs:
            p.stop()


def test_both_routers_route_by_the_kv_the_other_one_placed(replicas) -> None:
    (a, b), workers = replicas
    for first, second, tag in ((a, b, "a-then-b"), (b, a, "b-then-a")):
        placed: dict[str, str] = {}  # doc -> worker the first router chose
        for i in range(16):  # NOTE: ties between idle workers are random: go on until both got some
            doc = _doc(i, tag)
            placed[doc] = _ask(first, doc, "what is this?")[0]
            if len(placed) >= 4 and set(placed.values()) == set(workers):
                break
        assert set(placed.values()) == set(workers), f"the first router used only {set(placed.values())}"
        for doc, worker in placed.items():
            # NOTE: the worker queues a KV event to every subscriber in the engine step that
            # stores the blocks, before the first answer's last token: B has it by now
            chosen, cached = _ask(second, doc, "and a different question")
            assert chosen == worker, f"{tag}: the second router chose {chosen}, the prefix is on {worker}"
            assert cached >= 16 * 20  # most of the document came from that worker's cache

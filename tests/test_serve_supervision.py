"""`pdrouter serve` supervises its workers: one killed with SIGKILL under streams is restarted
on its port and rejoins the router's pool while the streams finish elsewhere; the stack keeps
serving, leaves no shared-memory segment behind and prints no resource-tracker warning. The
restart budget (back-off, give-up after K restarts in a window) is tested on its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from router.serve import RestartBudget, Stack
from tests.kv_helpers import route_workers, wait_for, worker_load
from tests.procs import Stack as ServeStack
from tests.streams import Stream, run_streams

STREAMS = 10
TOKENS = 100
DELAY_MS = 20  # NOTE: 100 tokens: >= 2 s per stream, time enough to kill a worker mid-stream
SHM = Path("/dev/shm")
PROMPT = "supervised stream " + "word " * 30  # NOTE: > 16 tokens: disaggregated below


# --- the restart budget -------------------------------------------------------------------


@pytest.mark.unit
def test_backoff_doubles_then_gives_up_after_max_restarts_in_the_window() -> None:
    b = RestartBudget(max_restarts=5, window_s=300.0, backoff_s=0.5)
    delays = [b.next_delay(t) for t in (0.0, 1.0, 3.0, 6.0, 11.0)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert b.next_delay(20.0) is None  # a sixth exit within 300 s: left down
    assert b.next_delay(299.9) is None
    # NOTE: the first restart (at 0) has left the window: one restart is granted again, with the
    # back-off of the four still in the window
    assert b.next_delay(300.0) == 8.0
    assert b.next_delay(300.5) is None


@pytest.mark.unit
def test_backoff_is_capped_and_starts_over_after_a_quiet_window() -> None:
    b = RestartBudget(max_restarts=10, window_s=60.0, backoff_s=1.0, backoff_max_s=5.0)
    assert [b.next_delay(float(t)) for t in range(7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert b.next_delay(1000.0) == 1.0  # ran well for a whole window: back to the first wait


@pytest.mark.unit
def test_max_restarts_zero_never_restarts() -> None:
    assert RestartBudget(max_restarts=0, window_s=300.0).next_delay(0.0) is None


# --- the supervisor over stand-in processes -------------------------------------------------

# A stand-in worker: creates a KV segment named as kvtransfer/pool.py names them, then dies
# the way `kill -9` kills (no clean-up of its own).
CRASHER = (
    "import os, signal; open(f'/dev/shm/pdrouter-kv-{os.getpid()}-0000supervise', 'w').close(); "
    "os.kill(os.getpid(), signal.SIGKILL)"
)
SLEEPER = "import time; time.sleep(60)"


def _segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"pdrouter-kv-{pid}-*"))


@pytest.mark.integration
def test_supervisor_restarts_with_backoff_removes_segments_and_gives_up(capsys) -> None:
    stack = Stack(budget=(2, 300.0, 0.5))
    try:
        crasher = stack.spawn("worker 0", [sys.executable, "-c", CRASHER], worker=True)
        stack.spawn("worker 1", [sys.executable, "-c", SLEEPER], worker=True)
        stack.spawn("router", [sys.executable, "-c", SLEEPER])
        now = 1000.0
        for restart, delay in ((1, 0.5), (2, 1.0)):
            crasher.proc.wait(timeout=30)
            dead_pid = crasher.pids[-1]
            assert _segments(dead_pid)  # the stand-in really left one
            assert stack.supervise(now) is None
            assert _segments(dead_pid) == []  # removed by serve: the process could not
            assert crasher.proc is None and stack.next_restart() == now + delay
            assert stack.supervise(now + delay - 0.01) is None and crasher.proc is None  # backing off
            assert stack.supervise(now + delay) is None
            assert crasher.proc is not None and len(crasher.pids) == restart + 1  # same argv, new pid
            now += delay + 1
        crasher.proc.wait(timeout=30)
        assert stack.supervise(now) is None  # the third exit: budget spent; worker 1 serves on
        assert crasher.proc is None and stack.next_restart() is None
        assert _segments(crasher.pids[-1]) == []
        assert stack.supervise(now + 3600) is None and len(crasher.pids) == 3  # never again
        err = capsys.readouterr().err
        assert err.count("worker 0 exited with code -9; restarting it in") == 2
        assert "worker 0 exited with code -9; not restarting it (--max-restarts 2 within 300 s" in err
        assert "worker 1" not in err
    finally:
        stack.stop(grace=5)
    assert all(c.proc is None or c.proc.poll() is not None for c in stack.children)


@pytest.mark.integration
def test_supervisor_stops_the_stack_when_no_worker_is_left() -> None:
    stack = Stack(budget=(0, 300.0, 0.5))  # --max-restarts 0: a worker that exits stays down
    try:
        worker = stack.spawn("worker 0", [sys.executable, "-c", CRASHER], worker=True)
        stack.spawn("router", [sys.executable, "-c", SLEEPER])
        worker.proc.wait(timeout=30)
        assert stack.supervise(0.0) == "no worker left; stopping the stack"
        assert _segments(worker.pids[-1]) == []
    finally:
        stack.stop(grace=5)


@pytest.mark.integration
def test_supervisor_stops_the_stack_when_the_router_dies() -> None:
    stack = Stack(budget=(5, 300.0, 0.5))
    try:
        worker = stack.spawn("worker 0", [sys.executable, "-c", SLEEPER], worker=True)
        router = stack.spawn("router", [sys.executable, "-c", "raise SystemExit(3)"])
        router.proc.wait(timeout=30)
        assert stack.supervise(0.0) == "router exited with code 3; stopping the stack"
        assert worker.proc.poll() is None  # stop() is the caller's: router first, then workers
    finally:
        stack.stop(grace=5)
    assert worker.proc.returncode == -signal.SIGTERM


# --- the real stack -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _worker_pids(serve_pid: int) -> dict[str, int]:
    """address -> pid of each worker process serve runs now (from their command lines)."""
    found = {}
    for pid in _children(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "worker" in argv and "--port" in argv:
            host = argv[argv.index("--host") + 1]
            found[f"{host}:{argv[argv.index('--port') + 1]}"] = pid
    return found


def _serving(address: str) -> bool:
    try:
        worker_load(address)
    except grpc.RpcError:
        return False
    return True


def _router_sees_healthy(base: str, address: str) -> bool:
    """The router's own view (its /metrics), not /ready: that needs one decode worker only."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return any(
        line.startswith("pdrouter_worker_healthy{")
        and f'worker="{address}"' in line
        and line.endswith(" 1.0")
        for line in text.splitlines()
    )


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _chat(base: str, content: str) -> tuple[int, dict[str, str]]:
    body = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, route_workers(r.headers["x-pdrouter-route"])
    except urllib.error.HTTPError as e:
        return e.code, {}


async def _streams_with_kill(base: str, kill) -> tuple[list[Stream], list[int]]:
    """STREAMS streams of TOKENS tokens; `kill(routes)` runs (in a thread) once every stream has
    tokens. Returns the streams, and each one's progress when the kill happened."""
    return await run_streams(base, [f"{i} {PROMPT}" for i in range(STREAMS)], TOKENS, kill)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("layout", "victim_role"),
    [
        (("--both", "2", "--router-arg=--decode-policy=round_robin"), "decode"),
        (("--prefill", "1", "--decode", "1", "--router-arg=--local-prefill-max-tokens=16"), "prefill"),
    ],
    ids=["both-2", "prefill-decode"],
)
def test_a_killed_worker_is_restarted_and_the_stack_keeps_serving(
    tmp_path, default_model_dir, layout, victim_role
) -> None:
    stack = ServeStack(
        tmp_path, *layout, "--model", str(default_model_dir), f"--worker-arg=--mock-token-delay-ms={DELAY_MS}"
    )
    serve = stack.proc
    try:
        before = _worker_pids(serve.pid)
        assert len(before) == 2
        wait_for(lambda: all(_serving(a) for a in before), 30, "both workers serving")
        owners = [pid for pid in before.values() if _worker_role(pid) != "decode"]
        assert all(_segments(pid) for pid in owners)  # NOTE: their KV pools are in shared memory
        killed: dict[str, object] = {}

        def kill(routes: list[dict[str, str]]) -> None:
            victim = routes[0][victim_role]  # NOTE: a worker with streams in flight
            killed.update(address=victim, pid=before[victim], routes=routes)
            os.kill(before[victim], signal.SIGKILL)

        results, at_kill = asyncio.run(_streams_with_kill(stack.base_url, kill))
        victim, old_pid = killed["address"], killed["pid"]
        on_victim = [i for i, r in enumerate(killed["routes"]) if r[victim_role] == victim]
        if victim_role == "decode":  # NOTE: its streams were cut mid-way and migrated
            assert any(at_kill[i] < TOKENS for i in on_victim), (at_kill, on_victim)
        assert [(s.tokens, s.finish) for s in results] == [(TOKENS, "length")] * STREAMS, serve.log()[-3000:]

        # the stack still serves while (and after) the worker restarts
        assert [_chat(stack.base_url, f"during {i}")[0] for i in range(4)] == [200] * 4
        assert "leaked shared_memory" not in serve.log()
        wait_for(lambda: _segments(old_pid) == [], 10, "the killed worker's KV segment removed")

        # the same port, a new process, back in the router's pool
        def back() -> bool:
            pid = _worker_pids(serve.pid).get(victim)
            return pid not in (None, old_pid) and _serving(victim)

        wait_for(back, 30, f"worker {victim} restarted")
        new_pid = _worker_pids(serve.pid)[victim]
        wait_for(lambda: _router_sees_healthy(stack.base_url, victim), 30, f"the router using {victim} again")
        assert _ready(stack.base_url)
        after = [_chat(stack.base_url, f"after {i} {PROMPT}") for i in range(4)]
        assert [code for code, _ in after] == [200] * 4
        assert any(route.get(victim_role) == victim for _, route in after), after  # it takes requests
        log = serve.log()
        assert f"exited with code -{signal.SIGKILL.value}; restarting it in 0.5 s" in log
        assert f"restarted (pid {new_pid})" in log
        assert "stopping the stack" not in log

        all_pids = {*before.values(), new_pid}
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.proc.wait(timeout=90) == 0, serve.log()[-3000:]
        assert [s for p in all_pids for s in _segments(p)] == []
        assert "leaked shared_memory" not in serve.log(), serve.log()[-3000:]
    finally:
        stack.stop()


def _worker_role(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("--role") + 1]

"""NVIDIA Dynamo's frontend with its mocker engine, as a peer in bench.overhead (`--dynamo`).

Installed on first use into its own virtualenv, bench/.venvs/dynamo (gitignored; never a
dependency of this project). A plain `pip install ai-dynamo==1.6.1` fails on this machine: its
required `aisimulate==0.13.0` ships only as an sdist whose build asks for CUDA (nvidia-smi). So
the `ai-dynamo` and `ai-dynamo-runtime` wheels go in with `--no-deps`, followed by the runtime
dependencies that `python -m dynamo.frontend` and `python -m dynamo.mocker` actually import.

Run loopback-only, with no etcd or NATS: file discovery (DYN_FILE_KV in the run's temp dir), the
TCP request plane, and the ZMQ event plane through a local XSUB/XPUB broker (in direct mode
Dynamo's event publishers bind 0.0.0.0, DYN_EVENT_PLANE_HOST only changing the address they
advertise; through a broker they connect to 127.0.0.1 instead; no measurable cost). The
mocker's `--speedup-ratio` is huge so it emits tokens as fast as it can (0 does not mean "no
delay" in 1.6.1: a 64-token stream then takes ~0.4 s). It streams one SSE chunk per token.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.procs import Proc, free_port

VERSION = "1.6.1"
VENV = Path(__file__).resolve().parent / ".venvs" / "dynamo"
_READY = VENV / ".pdrouter-installed"
# ai-dynamo-runtime's Requires-Dist, and ai-dynamo's less what the frontend and the mocker never
# import here (aisimulate: the CUDA sdist; kubernetes, redis: other discovery backends;
# transformers: the vLLM/SGLang chat processors), plus two they import without declaring them.
RUNTIME_DEPS = [
    "pydantic>=2.10.6,<=2.13.5", "uvloop>=0.21.0",  # ai-dynamo-runtime
    "aiohttp>=3.14.3,<4.0", "certifi>=2026.10.19", "msgspec>=0.19.0", "prometheus-client>=0.23.1,<1.0",
    "pyzmq>=26.0.0", "tqdm>=4.0.0", "typing-extensions>=4.10.0", "zstandard>=0.23,<1.0",  # ai-dynamo
    "packaging", "pyyaml",  # imported, not declared
]  # fmt: skip
SPEEDUP = "1e9"
MODEL = "default"
_BROKER = """
import sys, zmq
ctx = zmq.Context()
xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
xsub.bind(sys.argv[1])
xpub.bind(sys.argv[2])
zmq.proxy(xsub, xpub)
"""


class DynamoUnavailable(RuntimeError):
    """Dynamo could not be installed or started here; the message says exactly why."""


def _python() -> Path:
    return VENV / "bin" / "python"


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise DynamoUnavailable(
            f"cannot install NVIDIA Dynamo {VERSION} into {VENV}: {what} failed "
            f"(exit {done.returncode}): {' '.join(argv)}\n{tail}"
        )


def ensure_installed() -> Path:
    """The venv's python, installing Dynamo first if needed (a minute or two, once)."""
    if _READY.is_file() and _READY.read_text().strip() == VERSION and _python().exists():
        return _python()
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise DynamoUnavailable(
            f"ai-dynamo-runtime {VERSION} ships only a manylinux x86_64 wheel; this is "
            f"{sys.platform}/{platform.machine()}"
        )
    base = shutil.which("python3.11") or sys.executable
    shutil.rmtree(VENV, ignore_errors=True)  # a half-done install starts over
    print(f"installing NVIDIA Dynamo {VERSION} into {VENV} (once)", file=sys.stderr)
    _run([base, "-m", "venv", str(VENV)], "creating the virtualenv")
    pip = [str(_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", f"ai-dynamo=={VERSION}", f"ai-dynamo-runtime=={VERSION}"], "the wheels")
    _run([*pip, *RUNTIME_DEPS], "their runtime dependencies")
    _run([str(_python()), "-c", "import dynamo.frontend.main, dynamo.mocker.main"], "importing them")
    _READY.write_text(VERSION + "\n")
    return _python()


def tokenizer_dir(model_dir: Path, tmp: Path) -> Path:
    """`--model-path` for the mocker: the model's tokenizer files and a config.json that names an
    architecture (without `"architectures": ["LlamaForCausalLM"]` the frontend never lists it)."""
    config = json.loads((model_dir / "config.json").read_text())
    if "LlamaForCausalLM" in config.get("architectures", []):
        return model_dir
    out = tmp / "dynamo-model"
    out.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):  # fmt: skip
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    return out


def start(tmp: Path, model_dir: Path) -> tuple[list[Proc], str]:
    """Broker, mocker and frontend on 127.0.0.1; returns the processes and the frontend's URL."""
    py = str(ensure_installed())
    run_dir = Path(tempfile.mkdtemp(prefix="dynamo-", dir=tmp))
    xsub, xpub, http = free_port(), free_port(), free_port()
    env = {
        "DYN_FILE_KV": str(run_dir / "kv"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_ZMQ_BROKER_URL": f"xsub=tcp://127.0.0.1:{xsub},xpub=tcp://127.0.0.1:{xpub}",
        "DYN_SELF_HOST_METADATA": "0",
        "HOME": str(run_dir),  # its model-card cache (~/.cache/dynamo) stays in the run
    }
    planes = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    procs: list[Proc] = []
    try:
        procs.append(
            Proc([py, "-c", _BROKER, f"tcp://127.0.0.1:{xsub}", f"tcp://127.0.0.1:{xpub}"],
                 run_dir / "broker.log", env)
        )  # fmt: skip
        procs.append(
            Proc([py, "-m", "dynamo.mocker", "--model-path", str(tokenizer_dir(model_dir, run_dir)),
                  "--model-name", MODEL, "--speedup-ratio", SPEEDUP, *planes],
                 run_dir / "mocker.log", env)
        )  # fmt: skip
        procs.append(
            Proc([py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(http),
                  "--router-mode", "round-robin", *planes],
                 run_dir / "frontend.log", env)
        )  # fmt: skip
        base = f"http://127.0.0.1:{http}"
        _wait_model(base, procs, 120)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, base


def _wait_model(base: str, procs: list[Proc], timeout: float) -> None:
    """Ready once the frontend lists the mocker's model (discovered through the file store)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                if any(m.get("id") == MODEL for m in json.load(r).get("data", [])):
                    return
        except (OSError, ValueError):
            pass
        dead = [p for p in procs if not p.alive()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-2000:]}" for p in procs)
            raise DynamoUnavailable(f"Dynamo's frontend did not list model {MODEL!r}:\n{logs}")
        time.sleep(0.2)  # readiness poll

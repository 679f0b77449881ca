"""What every benchmark shares: machine/version record, percentiles, table, JSON + PNG output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VENVS = Path(__file__).resolve().parent / ".venvs"  # peers' and tools' own environments (gitignored)


def peer_venv(name: str, *requirements: str) -> Path:
    """bin/ of bench/.venvs/NAME, created with `requirements` on first use: peer systems and
    load tools never enter the project's own environment."""
    venv = VENVS / name
    marker = venv / ".pdrouter-installed"
    wanted = "\n".join(requirements)
    if not (marker.is_file() and marker.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *requirements], check=True)
        marker.write_text(wanted)
    return venv / "bin"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for mod in ("torch", "transformers", "grpc", "uvicorn", "msgspec"):
        with contextlib.suppress(Exception):  # NOTE: a missing optional package is just not recorded
            info[mod] = __import__(mod).__version__
    return info


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def headline(figures: dict[str, Any]) -> None:
    """The last stdout line: one JSON object of headline figures."""
    print(json.dumps(figures), flush=True)

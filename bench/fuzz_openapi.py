"""Schemathesis against the router's own /openapi.json: no 5xx, no crash, responses as documented.

    python -m bench.fuzz_openapi [--quick] [--max-examples N] [--seed S]

Starts `pdrouter serve --engine mock --both 1`, runs schemathesis (its own virtualenv,
bench/.venvs/schemathesis) over every operation in every phase (coverage, fuzzing, stateful)
with the checks status_code / content_type / response_headers / response_schema conformance,
plus our `no_server_error` (bench/fuzz_openapi_hooks.py: any 5xx fails, except the 504 of a
request whose own `x-request-timeout` passed). Afterwards the stack must still be alive and
answer a normal request. Goal: >= 1,000 generated requests, 0 failures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from bench.common import headline, peer_venv, save, table
from tests.procs import Stack

SCHEMATHESIS = "schemathesis==4.32.5"
CHECKS = ",".join((
    "no_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance",
))  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def served(base: str) -> bool:
    """One ordinary request, answered: the stack survived the run."""
    body = {"model": "default", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-examples", type=int, default=0, help="per operation (default: 80 quick, 200 full)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    examples = args.max_examples or (80 if args.quick else 200)
    st = peer_venv("schemathesis", SCHEMATHESIS) / "st"
    with tempfile.TemporaryDirectory(prefix="pdrouter-fuzz-") as tmp_dir:
        tmp = Path(tmp_dir)
        stack = Stack(tmp, "--both", "1")
        try:
            count_file = tmp / "checked"
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "bench.fuzz_openapi_hooks", "PYTHONPATH": str(ROOT),
                   "PDROUTER_FUZZ_COUNT_FILE": str(count_file)}  # fmt: skip
            argv = [str(st), "run", stack.base_url + "/openapi.json", "--checks", CHECKS,
                    "--max-examples", str(examples), "--seed", str(args.seed), "--no-color",
                    "--report", "json", "--report-json-path", str(tmp / "report.json"),
                    "--generation-database", "none"]  # fmt: skip
            done = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
            alive = stack.proc.alive() and served(stack.base_url)
        finally:
            stack.stop()
        if not (tmp / "report.json").is_file():
            raise SystemExit(f"schemathesis wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}")
        report = json.loads((tmp / "report.json").read_text())
        checked = int(count_file.read_text()) if count_file.is_file() else 0
    if not checked:
        raise SystemExit("the no_server_error hook never ran: 5xx would go unnoticed (SCHEMATHESIS_HOOKS?)")
    cases = report["test_cases"]
    rows = [
        [op, sum(p["accepted"] for p in r.values()), sum(p["rejected"] for p in r.values())]
        for op, r in sorted(report["valid_rates"].items())
    ]
    failures = report["failures"]
    print(f"schemathesis {report['schemathesis_version']}, {examples} examples per operation, "
          f"seed {args.seed}, {report['running_time']:.0f} s")  # fmt: skip
    print(table(["operation", "accepted (2xx)", "rejected (4xx)"], rows))
    print(f"generated {cases['generated']}, with failures {cases['with_failures']}, "
          f"errored {cases['errored']}, no_server_error checks {checked}, alive: {alive}")  # fmt: skip
    for failure in failures[:10]:
        print("FAILURE", json.dumps(failure)[:800])
    if done.returncode and not failures:
        print(done.stdout[-3000:])
    figures = {
        "requests": cases["generated"],
        "failures": cases["with_failures"] + cases["errored"],
        "server_error_checks": checked,
        "crashed": not alive,
        "exit_code": done.returncode,
    }
    save("fuzz_openapi", {"quick": args.quick, "examples": examples, "seed": args.seed, "report": report,
                          **figures})  # fmt: skip
    headline(figures)


if __name__ == "__main__":
    main()

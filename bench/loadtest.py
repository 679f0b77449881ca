"""A standard OpenAI load tool against the router: GuideLLM, side by side with the worker direct.

    python -m bench.loadtest [--quick] [--target URL --model NAME [--api-key KEY]]

GuideLLM (its own virtualenv, bench/.venvs/guidellm, CPU torch 2.13.0) runs concurrent streaming
chat requests of synthetic 128-token prompts and 64 output tokens, tokenized with the default
model's tokenizer (offline). Without --target it starts one mock worker (5 ms decode steps, so
every token is its own chunk) and our router in front of it, and measures both paths in the same
run: the ratio is what the router costs as seen by a tool we did not write. With --target it
measures that endpoint alone (a real deployment; --api-key is sent as a Bearer token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import headline, peer_venv, save, table
from bench.routing import Workers
from tests.procs import Proc, free_port, pdrouter, wait_http_ok
from workers.model_files import resolve_model

GUIDELLM = ("torch==2.13.0", "guidellm==0.8.1")  # NOTE: torch first: the local CPU wheel
MOCK_TIMING = "0,0,0,5,0,0"


def guidellm(target: str, model: str, streams: int, requests: int, out: Path, api_key: str = "") -> dict:
    """One GuideLLM run; its JSON report's first benchmark."""
    backend = f"kind=openai_http,target={target},model={model}" + (f",api_key={api_key}" if api_key else "")
    argv = [
        str(peer_venv("guidellm", *GUIDELLM) / "guidellm"), "run", "--backend", backend,
        "--profile", f"kind=concurrent,streams={streams}",
        "--data", "kind=synthetic_text,prompt_tokens=128,output_tokens=64",
        "--constraint", f"kind=max_requests,count={requests}",
        "--tokenizer", f"kind=huggingface_auto,model={resolve_model('default')}",
        "--output", f"kind=json,path={out}", "--disable-console-interactive",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, cwd=out.parent, capture_output=True, text=True, timeout=1200)
    if done.returncode or not out.is_file():
        raise SystemExit(f"guidellm failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(out.read_text())["benchmarks"][0]


def summary(bench: dict) -> dict[str, float]:
    m = bench["metrics"]

    def p(name: str, q: str) -> float:
        return m[name]["successful"]["percentiles"][q]

    totals = m["request_totals"]
    return {
        "req_s": m["requests_per_second"]["successful"]["mean"],
        "out_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
        "ttft_p50_ms": p("time_to_first_token_ms", "p50"),
        "ttft_p99_ms": p("time_to_first_token_ms", "p99"),
        "itl_p50_ms": p("inter_token_latency_ms", "p50"),
        "itl_p99_ms": p("inter_token_latency_ms", "p99"),
        "ok": totals["successful"],
        "errors": totals["errored"] + totals["incomplete"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target", default="", help="measure this OpenAI endpoint alone (e.g. http://host:8000)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key", default=os.environ.get("PDROUTER_API_KEY", ""))
    args = ap.parse_args()
    levels, requests = ([8], 100) if args.quick else ([1, 8, 32], 200)
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pdrouter-loadtest-") as tmp_dir:
        tmp = Path(tmp_dir)
        procs: list[Proc] = []
        workers = None
        try:
            if args.target:
                paths = {"target": args.target}
            else:
                workers = Workers(tmp, 1, MOCK_TIMING, http=True)
                port = free_port()
                router = Proc(pdrouter("router", "--port", str(port), "--grpc-port", str(free_port()),
                                       "--worker", workers.addresses[0]), tmp / "router.log")  # fmt: skip
                procs.append(router)
                paths = {"direct": workers.http_urls[0], "pdrouter": f"http://127.0.0.1:{port}"}
                wait_http_ok(paths["pdrouter"] + "/ready", router, 60)
            for c in levels:
                for name, url in paths.items():
                    out = tmp / f"{name}-{c}.json"
                    bench = guidellm(url, args.model, c, requests, out, args.api_key)
                    results.setdefault(name, {})[c] = summary(bench)
        finally:
            for proc in procs:
                proc.stop()
            if workers is not None:
                workers.stop()
    keys = ["req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "ok", "errors"]
    rows = [[name, c, *(r[k] for k in keys)] for name, by_c in results.items() for c, r in by_c.items()]
    tool = "guidellm " + GUIDELLM[1].split("==")[1]
    where = "" if args.target else f"; 1 mock worker ({MOCK_TIMING})"
    print(f"{tool}: streams, 128-token prompts, 64 output tokens, {requests} requests/level{where}")
    print(table(["path", "c", *keys], rows))
    top = max(levels)
    figures: dict[str, float | int | str] = {
        "tool": tool,
        "errors": sum(r["errors"] for by_c in results.values() for r in by_c.values()),
    }
    if "pdrouter" in results:
        ours, direct = results["pdrouter"][top], results["direct"][top]
        figures[f"req_s_c{top}"] = round(ours["req_s"], 1)
        figures[f"req_s_ratio_vs_direct_c{top}"] = round(ours["req_s"] / direct["req_s"], 3)
        figures[f"ttft_p50_added_ms_c{top}"] = round(ours["ttft_p50_ms"] - direct["ttft_p50_ms"], 2)
    target = args.target or "local mock"
    save("loadtest", {"quick": args.quick, "target": target, "results": results, **figures})
    headline(figures)


if __name__ == "__main__":
    main()

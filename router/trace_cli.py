"""`pdrouter trace`: one recent request as a terminal waterfall, or the slowest recent requests.

Reads the router's `GET /debug/requests/...` (the router keeps the last few thousand request
timelines) and says where the time to first token went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

WIDTH = 50


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdrouter trace", description=__doc__.splitlines()[0])
    p.add_argument("request_id", nargs="?", help="x-request-id or response id (chatcmpl-..., cmpl-...)")
    p.add_argument("--slowest", type=int, default=0, metavar="N", help="list the N slowest recent requests")
    p.add_argument("--by", choices=["ttft", "e2e"], default="ttft", help="--slowest: order by")
    p.add_argument("--url", default=os.environ.get("PDROUTER_URL", "http://127.0.0.1:8000"), help="router")
    p.add_argument("--api-key", default=os.environ.get("PDROUTER_API_KEY", "").split(",")[0])
    p.add_argument("--json", action="store_true", help="print the raw timeline JSON")
    return p


def fetch(url: str, api_key: str) -> object:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise SystemExit(f"pdrouter trace: {e.code} from {url}: {message}") from None
    except OSError as e:
        raise SystemExit(f"pdrouter trace: cannot reach the router at {url}: {e}") from None


def _bar(start: float, end: float, total: float) -> str:
    scale = WIDTH / total if total > 0 else 0.0
    a = min(WIDTH - 1, int(start * scale))
    b = max(a + 1, min(WIDTH, round(end * scale)))
    return " " * a + "#" * (b - a) + " " * (WIDTH - b)


def render(tl: dict) -> str:
    total = tl["e2e_ms"]
    out = [
        f"request {tl['request_id']}  ({', '.join(tl['aliases'])})  status {tl['status']}  {tl['mode']}",
        f"route   {tl['route']}",
    ]
    if tl["trace_id"]:
        out.append(f"trace   {tl['trace_id']}")
    ttft = tl["ttft_ms"]
    itl = f"ITL p50 {tl['itl_p50_ms']:.1f} / p95 {tl['itl_p95_ms']:.1f} / max {tl['itl_max_ms']:.1f} ms" if (
        tl["itl_p50_ms"] is not None) else "ITL -"  # fmt: skip
    out.append(
        f"TTFT {ttft:.1f} ms   e2e {total:.1f} ms   {len(tl['tokens_ms'])} tokens   {itl}"
        if ttft is not None
        else f"no token reached the client   e2e {total:.1f} ms"
    )
    out.append("")
    out.append(
        f"{'stage':<22}{'start ms':>9}{'dur ms':>9}  |{'0':<{WIDTH - len(f'{total:.0f} ms')}}{total:.0f} ms|"
    )
    worker = tl["worker"]
    for st in tl["stages"]:
        dur = st["end_ms"] - st["start_ms"]
        bar = _bar(st["start_ms"], st["end_ms"], total)
        out.append(f"{st['name']:<22}{st['start_ms']:>9.1f}{dur:>9.1f}  |{bar}|")
        for label, ms in _inside(st["name"], dur, worker, tl["mode"]):
            out.append(f"  {label:<20}{'':>9}{ms:>9.1f}")
    if tl["tokens_ms"]:
        line = [" "] * WIDTH
        for t in tl["tokens_ms"]:
            line[min(WIDTH - 1, int(t * WIDTH / total)) if total > 0 else 0] = "*"
        out.append(f"{'tokens':<22}{'':>9}{'':>9}  |{''.join(line)}|")
    if ttft is not None and tl["stages"]:
        out.append("")
        out.append(where_ttft_went(tl))
    return "\n".join(out)


def _inside(stage: str, dur: float, worker: dict, mode: str) -> list[tuple[str, float]]:
    """The worker's own split of a stage (what the router alone cannot see)."""
    if stage == "prefill":
        q = worker.get("prefill_queue_ms" if mode == "disaggregated" else "decode_queue_ms")
        c = worker.get("prefill_compute_ms")
        parts = []
        if q is not None:
            parts.append(("worker queue", q))
        if c is not None:
            parts.append(("worker compute", c))
        if q is not None and c is not None:
            parts.append(("rpc + network", max(0.0, dur - q - c)))
        return parts
    if stage == "decode" and worker.get("kv_transfer_ms"):
        return [("kv transfer", worker["kv_transfer_ms"])]
    return []


def where_ttft_went(tl: dict) -> str:
    ttft = tl["ttft_ms"]
    parts = [(s["name"], s["end_ms"] - s["start_ms"]) for s in tl["stages"] if s["name"] != "decode"]
    total = sum(ms for _, ms in parts)
    terms = " + ".join(f"{name} {ms:.1f}" for name, ms in parts)
    top = max(parts, key=lambda p: p[1])
    return (
        f"TTFT {ttft:.1f} ms = {terms} (sum {total:.1f} ms)\n"
        f"where TTFT went: {top[0]} {top[1] / ttft * 100 if ttft else 0:.0f}%"
    )


def render_list(items: list[dict], by: str) -> str:
    rows = [
        f"{'request':<34}{'status':>7}{'mode':>15}{'ttft ms':>10}{'e2e ms':>10}{'tokens':>8}  slowest stage"
    ]
    for tl in items:
        stages = [s for s in tl["stages"] if s["name"] != "decode"] or tl["stages"]
        top = max(stages, key=lambda s: s["end_ms"] - s["start_ms"]) if stages else None
        slow = f"{top['name']} {top['end_ms'] - top['start_ms']:.1f} ms" if top else "-"
        ttft = f"{tl['ttft_ms']:.1f}" if tl["ttft_ms"] is not None else "-"
        rows.append(f"{tl['request_id']:<34}{tl['status']:>7}{tl['mode']:>15}{ttft:>10}{tl['e2e_ms']:>10.1f}"
                    f"{len(tl['tokens_ms']):>8}  {slow}")  # fmt: skip
    return f"slowest recent requests by {by}\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    base = args.url.rstrip("/") + "/debug/requests"
    if args.slowest:
        data = fetch(f"{base}?slowest={args.slowest}&by={args.by}", args.api_key)
        print(json.dumps(data, indent=2) if args.json else render_list(data, args.by))  # type: ignore[arg-type]
        return
    if not args.request_id:
        print("pdrouter trace: give a REQUEST_ID or --slowest N", file=sys.stderr)
        raise SystemExit(2)
    data = fetch(f"{base}/{urllib.parse.quote(args.request_id, safe='')}", args.api_key)
    print(json.dumps(data, indent=2) if args.json else render(data))  # type: ignore[arg-type]

"""`pdrouter` command: dispatches to the process it names."""

from __future__ import annotations

import sys

USAGE = """usage: pdrouter {serve,router,worker,trace,calibrate} [options]

  serve      start router + workers on this machine (the whole stack)
  router     run the router (OpenAI HTTP + gRPC front door) over --worker addresses
  worker     run one worker (gRPC Worker service over the hf or mock engine)
  trace      show one recent request as a waterfall (where TTFT went), or the slowest ones
  calibrate  time the real engine on this machine and fit the mock engine's --mock-timing

'pdrouter COMMAND --help' shows a command's options."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from router.serve import main as run
    elif command == "router":
        from router.main import main as run
    elif command == "worker":
        from workers.main import main as run
    elif command == "trace":
        from router.trace_cli import main as run
    elif command == "calibrate":
        from workers.calibrate import main as run
    else:
        print(f"pdrouter: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    run(rest)


if __name__ == "__main__":
    main()

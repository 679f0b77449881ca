"""Options from the command line, the environment and a TOML file, for every pdrouter command.

Precedence: command line > `PDROUTER_<FLAG>` environment variable (`--grpc-port` ->
`PDROUTER_GRPC_PORT`) > `--config FILE` (TOML; or `PDROUTER_CONFIG`) > the flag's default.
`--print-config` prints the effective configuration as TOML, each value's source in a comment,
and exits.

The file's keys are flag names (`grpc-port` or `grpc_port`). A table named after a command
(`[router]`, `[worker]`, `[serve]`) holds keys for that command only and wins over the top level.
A file without such tables is strict: a key the command does not have is an error. A file with
them shares its top level between commands (each takes the keys it has) and keeps each table
strict. Repeatable flags (`--worker`) take a TOML array, or a comma-separated list in the
environment; switches (`--no-session-affinity`) a boolean (`1/true/yes/on`, `0/false/no/off`).

Lives in workers/ (like telemetry.py) so router and workers share it; it imports neither.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tomllib
from typing import Any

ENV_PREFIX = "PDROUTER_"
COMMANDS = ("serve", "router", "worker", "calibrate", "trace")
_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off", ""))
_OWN = ("help", "config", "print_config")
_SECRET = frozenset(("api-key",))  # NOTE: --print-config says these are set, never what they are


def env_name(flag: str) -> str:
    """`--grpc-port` -> `PDROUTER_GRPC_PORT`."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, command: str) -> argparse.Namespace:
    """`parser.parse_args(argv)` with env and file values under the command line; adds --config
    and --print-config to `parser`. `args.config` is the file used (or None)."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML file of options (top level or [{command}])")
    parser.add_argument("--print-config", action="store_true", help="print the effective options and exit")
    flags = _flags(parser)
    cli = _explicit(parser, argv)
    values = {a.dest: _default(a) for a in flags.values()}
    sources = dict.fromkeys(values, "default")
    path = cli.pop("config", None) or os.environ.get(env_name("config")) or None
    show = cli.pop("print_config", False)
    if path:
        for name, raw in _file_options(parser, path, command, flags).items():
            action = flags[name]
            values[action.dest] = _convert(parser, action, raw, f"{name} in {path}")
            sources[action.dest] = f"file {path}"
    for name, action in flags.items():
        raw = os.environ.get(env_name(name))
        if raw is not None:
            values[action.dest] = _convert(parser, action, raw, env_name(name))
            sources[action.dest] = f"env {env_name(name)}"
    for dest, value in cli.items():
        values[dest], sources[dest] = value, "command line"
    if show:
        print(render(command, flags, values, sources), end="")
        raise SystemExit(0)
    return argparse.Namespace(**values, config=path)


def env_names(parser: argparse.ArgumentParser) -> set[str]:
    """The variables a command reads (`pdrouter serve` keeps its own from its children)."""
    return {env_name(name) for name in _flags(parser)} | {env_name("config")}


def tables(path: str) -> set[str]:
    """The command tables of a config file (`pdrouter serve` passes the file on to a child
    process when it has that child's table)."""
    with open(path, "rb") as fh:
        return {k for k, v in tomllib.load(fh).items() if isinstance(v, dict)}


def render(command: str, flags: dict[str, argparse.Action], values: dict, sources: dict) -> str:
    """The effective options as a TOML `[command]` table (a valid --config file)."""
    lines = [f"# pdrouter {command}: command line > environment > --config file > default", f"[{command}]"]
    for name, action in flags.items():
        value = values[action.dest]
        if value is None:
            lines.append(f"# {name} is not set  # {sources[action.dest]}")
        elif name in _SECRET and value:
            lines.append(f"# {name} is set ({len(value)}, not shown)  # {sources[action.dest]}")
        else:
            lines.append(f"{name} = {_toml(value)}  # {sources[action.dest]}")
    return "\n".join(lines) + "\n"


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Flag name without dashes -> its action, for every long option but our own."""
    out = {}
    for action in parser._actions:
        long = next((s for s in action.option_strings if s.startswith("--")), None)
        if long is not None and action.dest not in _OWN:
            out[long[2:]] = action
    return out


def _explicit(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """Only what the command line itself gave (every default suppressed for this one parse)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for a, default in saved:
            a.default = default


def _default(action: argparse.Action) -> Any:
    d = action.default
    if isinstance(d, list):
        return list(d)
    if isinstance(d, str) and action.type is not None:
        return action.type(d)
    return d


def _file_options(
    parser: argparse.ArgumentParser, path: str, command: str, flags: dict[str, argparse.Action]
) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for name in tables:
        if name not in COMMANDS:
            parser.error(f"--config {path}: unknown table [{name}]; tables are {', '.join(COMMANDS)}")
    out = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name in tables:
            continue
        if name in flags:
            out[name] = value
        elif not tables:
            parser.error(f"--config {path}: unknown option {key!r} for pdrouter {command}")
    for key, value in tables.get(command, {}).items():
        name = key.replace("_", "-")
        if name not in flags:
            parser.error(f"--config {path}: unknown option {key!r} in [{command}]")
        out[name] = value
    return out


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    """A file or environment value as the command line would have given it, checked the same way."""
    if action.nargs == 0:  # a switch (store_true / store_false)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            raw = raw.strip().lower() in _TRUE
        if not isinstance(raw, bool):
            parser.error(f"{where}: expected a boolean (true/false), got {raw!r}")
        return action.const if raw else not action.const
    if isinstance(action, argparse._AppendAction):
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            parser.error(f"{where}: expected a list, got {raw!r}")
        return [_scalar(parser, action, item, where) for item in items]
    return _scalar(parser, action, raw, where)


def _scalar(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    kind = action.type or str
    if isinstance(raw, str):
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            parser.error(f"{where}: invalid {getattr(kind, '__name__', 'value')} {raw!r}")
    elif isinstance(raw, bool) or not isinstance(raw, int | float if kind is float else kind):
        parser.error(f"{where}: expected {getattr(kind, '__name__', 'a value')}, got {raw!r}")
    else:
        value = kind(raw)
    if action.choices is not None and value not in action.choices:
        parser.error(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # NOTE: JSON string escapes are valid in TOML basic strings

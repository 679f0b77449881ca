"""Options from the command line, PDROUTER_* variables and a TOML file: precedence, checks,
--print-config (in-process on the real parsers, and once as a real command)."""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest

from router.main import build_parser as router_parser
from router.serve import build_parser as serve_parser
from tests.procs import ROOT, pdrouter
from workers.config import env_name, parse_args
from workers.main import build_parser as worker_parser

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith("PDROUTER_") and key not in ("PDROUTER_CACHE_DIR", "PDROUTER_LOG_LEVEL"):
            monkeypatch.delenv(key)


def _write(tmp_path, text: str):
    path = tmp_path / "pdrouter.toml"
    path.write_text(text)
    return str(path)


def test_env_name() -> None:
    assert env_name("--grpc-port") == "PDROUTER_GRPC_PORT"
    assert env_name("no-session-affinity") == "PDROUTER_NO_SESSION_AFFINITY"


def test_precedence_cli_over_env_over_file_over_default(tmp_path, monkeypatch) -> None:
    path = _write(tmp_path, 'port = 7000\ngrpc-port = 7001\nmigration_limit = 5\nworker = ["f:1"]\n')
    monkeypatch.setenv("PDROUTER_GRPC_PORT", "8001")
    monkeypatch.setenv("PDROUTER_MIGRATION_LIMIT", "6")
    monkeypatch.setenv("PDROUTER_WORKER", "e:1, e:2")
    args = parse_args(
        router_parser(), ["--config", path, "--migration-limit", "9", "--worker", "c:1"], "router"
    )
    assert args.port == 7000  # file
    assert args.grpc_port == 8001  # env over file
    assert args.migration_limit == 9  # command line over env and file
    assert args.worker == ["c:1"]  # a repeated flag on the command line replaces, never appends
    assert args.host == "127.0.0.1" and args.kv_overlap_weight == 4.0  # defaults
    assert args.config == path
    monkeypatch.delenv("PDROUTER_WORKER")
    assert parse_args(router_parser(), ["--config", path], "router").worker == ["f:1"]


def test_env_types_switches_and_config_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDROUTER_CONFIG", _write(tmp_path, "[worker]\nrole = 'decode'\n"))
    monkeypatch.setenv("PDROUTER_MOCK_TOKEN_DELAY_MS", "2.5")
    monkeypatch.setenv("PDROUTER_KV_TRANSFER", "tcp")
    args = parse_args(worker_parser(), [], "worker")
    assert (args.role, args.mock_token_delay_ms, args.kv_transfer) == ("decode", 2.5, "tcp")
    monkeypatch.setenv("PDROUTER_NO_SESSION_AFFINITY", "on")
    assert parse_args(router_parser(), [], "router").no_session_affinity is True
    monkeypatch.setenv("PDROUTER_NO_SESSION_AFFINITY", "false")
    assert parse_args(router_parser(), [], "router").no_session_affinity is False


def test_command_tables_share_the_top_level(tmp_path) -> None:
    path = _write(
        tmp_path,
        'host = "0.0.0.0"\nengine = "mock"\n[router]\nport = 9100\n[worker]\nport = 9200\nrole = "prefill"\n',
    )
    r = parse_args(router_parser(), ["--config", path], "router")
    w = parse_args(worker_parser(), ["--config", path], "worker")
    s = parse_args(serve_parser(), ["--config", path], "serve")
    assert (r.host, r.port) == ("0.0.0.0", 9100)  # `engine` is not a router option: skipped
    assert (w.host, w.port, w.role, w.engine) == ("0.0.0.0", 9200, "prefill", "mock")
    assert (s.host, s.port, s.engine) == ("0.0.0.0", 8000, "mock")


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("prot = 1\n", {}, "unknown option 'prot'"),
        ("[router]\nprot = 1\n", {}, "unknown option 'prot' in [router]"),
        ("[routr]\nport = 1\n", {}, "unknown table [routr]"),
        ('port = "eighty"\n', {}, "invalid int 'eighty'"),
        ("port = 1.5\n", {}, "expected int"),
        ('decode-policy = "fastest"\n', {}, "'fastest' is not one of"),
        ("no-session-affinity = 1\n", {}, "expected a boolean"),
        ("port = \n", {}, "--config"),
        ("", {"PDROUTER_PORT": "x"}, "PDROUTER_PORT: invalid int 'x'"),
        ("", {"PDROUTER_NO_SESSION_AFFINITY": "maybe"}, "expected a boolean"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, monkeypatch, capsys, text, env, message) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        parse_args(router_parser(), ["--config", _write(tmp_path, text)], "router")
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_print_config_is_a_config_file(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PDROUTER_PORT", "9300")
    path = _write(tmp_path, "[router]\nworker = ['a:1', 'b:2']\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(router_parser(), ["--config", path, "--grpc-port", "9301", "--print-config"], "router")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "port = 9300  # env PDROUTER_PORT" in out
    assert "grpc-port = 9301  # command line" in out
    assert f'worker = ["a:1", "b:2"]  # file {path}' in out
    assert 'host = "127.0.0.1"  # default' in out
    printed = _write(tmp_path, out)
    monkeypatch.delenv("PDROUTER_PORT")
    again = parse_args(router_parser(), ["--config", printed], "router")
    assert (again.port, again.grpc_port, again.worker) == (9300, 9301, ["a:1", "b:2"])
    assert tomllib.loads(out)["router"]["kv-overlap-weight"] == 4.0


def test_print_config_command_exits_before_starting(tmp_path) -> None:
    """As a real process: prints and exits 0 without loading a model or binding a port."""
    env = {**os.environ, "PDROUTER_ROLE": "decode"}
    out = subprocess.run(
        pdrouter("worker", "--print-config", "--port", "0"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    table = tomllib.loads(out)["worker"]
    assert table["role"] == "decode" and table["port"] == 0 and table["drain-seconds"] == 30.0

"""The checked-in generated stubs must match what `make proto` would generate now."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "pdrouter_proto").glob("*.proto"))
    assert protos, "no .proto sources found"
    out = [f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", *out, *protos], cwd=ROOT, check=True
    )
    generated = sorted((tmp_path / "pdrouter_proto").iterdir())
    assert generated
    stale = [p.name for p in generated if p.read_bytes() != (ROOT / "pdrouter_proto" / p.name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto`"


def test_router_imports_no_torch() -> None:
    code = (
        "import sys, router.main, router.serve, router.http_api, router.grpc_api\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

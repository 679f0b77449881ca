from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import Stack


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted once into the pdrouter cache)."""
    from workers.model_files import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def mock_stack(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    """`pdrouter serve --engine mock --both 2` for a whole test module."""
    stack = Stack(
        tmp_path_factory.mktemp("mock_stack"), "--both", "2", "--worker-arg=--mock-token-delay-ms=1"
    )
    yield stack
    stack.stop()

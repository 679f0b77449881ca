"""Freed tensor memory stays in the process: a repeated large step does not fault its pages in anew."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import pytest

from tests._tiny_llama import Driver
from workers.engine.host_memory import keep_freed_memory
from workers.engine.model_runner import ModelRunner
from workers.engine.sequence import ScheduledSeq

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")


@pytest.mark.unit
@glibc_only
def test_glibc_takes_the_settings() -> None:
    assert keep_freed_memory()


@pytest.mark.e2e
@glibc_only
def test_repeated_1500_token_prefill_faults_almost_no_pages(default_model_dir: Path) -> None:
    """Without the settings each such SmolLM2 step faulted in 30,000-77,000 pages (measured)."""
    runner = ModelRunner(default_model_dir, num_blocks=128, threads=2)
    driver = Driver(runner)
    seqs = [driver.new_seq(f"r{i}", [(7 * i + j) % 5000 + 10 for j in range(50)]) for i in range(30)]
    driver.step(seqs)  # NOTE: allocates every block and the step's activations once
    batch = [ScheduledSeq(s, 0, 50, True) for s in seqs]
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        runner.execute(batch)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults) < 5_000, f"page faults per repeated step: {faults}"

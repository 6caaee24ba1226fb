"""The benchmarks still run: a smoke pass of each, its table printed, no timings checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def smoke(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_bench_pipeline_smoke_runs_and_prints_the_table():
    output = smoke("pipeline.py")
    assert "method          images failed   wall s   img/s    MP/s   CPU s img/CPU s" in output
    for line in ("pipeline / tutorial", "pipeline / decode floor", "quality vs", "peak RSS"):
        assert line in output


def test_bench_sweep_smoke_runs_and_prints_the_table():
    output = smoke("sweep.py")
    header = " recorded  waiting  claimed  sweep s  queries  scan s  claim s  queue s    msg/s"
    assert header in output
    assert "queries per sweep:" in output


@pytest.mark.integration
def test_bench_system_smoke_runs_and_prints_the_table():
    output = smoke("system.py")
    header = "method                             images failed   wall s   img/s  CPU ms/img  runs"
    assert header in output
    for line in ("system, drop -> recorded", "system / pipeline alone", "system / tutorial"):
        assert line in output

"""The sweep benchmark still runs: a smoke pass (200 files, 1,000 recorded), no timings checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sweep.py"


def test_bench_sweep_smoke_runs_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert " recorded  waiting  claimed  sweep s  queries  scan s  claim s  queue s    msg/s" in (
        result.stdout
    )
    assert "queries per sweep:" in result.stdout

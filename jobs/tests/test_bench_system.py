"""The system benchmark still runs: real Redis, worker and beat on a few images, no timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "system.py"


@pytest.mark.integration
def test_bench_system_smoke_runs_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "method                             images failed   wall s   img/s  CPU ms/img  runs"
        in (result.stdout)
    )
    for line in ("system, drop -> recorded", "system / pipeline alone", "system / tutorial"):
        assert line in result.stdout

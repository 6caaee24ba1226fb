"""The benchmark script still runs: a smoke pass on a tiny generated corpus, no timings checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


def test_bench_pipeline_smoke_runs_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "method          images failed   wall s   img/s    MP/s   CPU s img/CPU s" in (
        result.stdout
    )
    for line in ("pipeline / tutorial", "pipeline / decode floor", "quality vs", "peak RSS"):
        assert line in result.stdout

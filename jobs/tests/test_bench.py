"""The benchmarks still run: a smoke pass of each, its table printed, no timings checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def smoke(script: str) -> str:
    process = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGTERM, so that the benchmark stops the Redis, worker and beat it started.
        process.terminate()
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"{script} --smoke did not finish in 300 s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return stdout


def test_bench_pipeline_smoke_runs_and_prints_the_table():
    output = smoke("pipeline.py")
    assert "method          images failed   wall s   img/s    MP/s   CPU s img/CPU s" in output
    for line in ("pipeline / tutorial", "pipeline / decode floor", "quality vs", "peak RSS"):
        assert line in output
    # What no pipeline avoids, measured beside the floors: a figure for every format.
    bare = [line for line in output.splitlines() if line.startswith("bare minimum ")]
    assert bare, output
    assert int(bare[0].split()[2]) > 0, bare
    for kind in ("baseline JPEG", "PNG", "WebP"):
        rows = [line for line in output.splitlines() if line.startswith(kind)]
        assert rows, output
        assert all(float(row.split()[-1]) > 0 for row in rows), rows


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
    # The pool processes' own account of each image task came through, with figures.
    parts = {
        line.rsplit(None, 2)[0].strip(): float(line.rsplit(None, 2)[1])
        for line in output.splitlines()
        if line.startswith("  ") and line.endswith(" ms") and "of it" not in line
    }
    for part in ("jobs.runner (the pipeline included)", "Celery's SUCCESS result row"):
        assert parts[part] > 0, output
    assert "pool processes idle:" in output
    # The pool processes' peak memory, to set against WORKER_MEMORY_MB.
    (peak,) = [line for line in output.splitlines() if "peak resident memory" in line]
    assert int(peak.split(": ")[1].split(" MB")[0]) > 20, peak

"""The set-up of a pool process, run in a fresh process of its own: the OS limit behind
WORKER_MEMORY_MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobs import pipeline

ROOT = Path(__file__).resolve().parents[2]

LIMITED = r"""
import json, resource
from jobs import pipeline, worker

budget = 300 * pipeline.MiB
limit = worker.limit_memory(budget)
soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
held = pipeline.memory_in_use()
try:
    ballast = bytearray(budget)
    outcome = "allocated"
except MemoryError:
    outcome = "MemoryError"
small = bytearray(16 * pipeline.MiB)  # what fits still does
print(json.dumps({"limit": limit, "soft": soft, "held": held, "outcome": outcome}))
"""


def test_limit_memory_makes_an_allocation_over_the_budget_fail():
    result = subprocess.run(
        [sys.executable, "-c", LIMITED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["outcome"] == "MemoryError"
    assert figures["soft"] == figures["limit"]
    # The budget less the library pages resident, and room for more of them.
    assert figures["limit"] <= 300 * pipeline.MiB - pipeline.MEMORY_SLACK
    assert figures["held"] < figures["limit"]

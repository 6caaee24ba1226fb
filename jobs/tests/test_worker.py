"""The set-up of a pool process: the OS limit behind WORKER_MEMORY_MB, run in a fresh
process of its own, and the database connections it keeps between tasks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection, transaction

from jobs import pipeline
from jobs.models import Image
from jobs.tasks import make_thumbnails
from jobs.worker import keep_database_connections

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


@pytest.mark.django_db(transaction=True)
def test_connections_are_kept_between_tasks_until_they_are_too_old():
    Image.objects.exists()
    kept = connection.connection
    keep_database_connections(sender=make_thumbnails)
    assert connection.connection is kept

    connection.close_at = time.monotonic() - 1  # past CONN_MAX_AGE
    keep_database_connections(sender=make_thumbnails)
    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_task_run_eagerly_leaves_the_callers_transaction_alone():
    with transaction.atomic():
        Image.objects.exists()
        connection.close_at = time.monotonic() - 1
        make_thumbnails.push_request(is_eager=True)
        try:
            keep_database_connections(sender=make_thumbnails)
        finally:
            make_thumbnails.pop_request()
        # Closed inside a transaction, Django would mark it for rollback, and the next
        # query would fail on the closed connection.
        assert not connection.needs_rollback
        assert not Image.objects.exists()

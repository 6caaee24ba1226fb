"""Operator commands: `manage.py sweep` and `manage.py jobs`."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from jobs.models import Image

from .conftest import celery_broker

pytestmark = pytest.mark.django_db


def run_command(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_sweep_inline_processes_the_folder_and_shows_progress(folders, drop):
    drop(folders["watch"], "a.jpg")
    drop(folders["watch"], "b.txt", b"hello")
    output = run_command("sweep", "--inline", "--sizes", "50x50")
    assert "2 new" in output
    assert "[" + "#" * 30 + "] 2/2 finished, 1 failed" in output
    assert "failed: b.txt: not an image" in output
    assert Image.objects.get(name="a.jpg").thumbnails == {"50x50": [50, 38]}


def test_sweep_rejects_a_folder_outside_the_roots(folders):
    with pytest.raises(CommandError, match="outside the allowed WATCH_ROOTS"):
        run_command("sweep", "--folder", "/etc")


def test_jobs_json_lists_every_image_with_its_outcome(folders, drop):
    drop(folders["watch"], "good.jpg")
    drop(folders["watch"], "bad.jpg", b"")
    run_command("sweep", "--inline")
    rows = {row["name"]: row for row in json.loads(run_command("jobs", "--json"))}
    assert rows["good.jpg"]["status"] == "done"
    assert rows["good.jpg"]["archive"].startswith(str(folders["media"]))
    assert len(rows["good.jpg"]["sha256"]) == 64
    assert rows["good.jpg"]["error"] is None
    assert rows["bad.jpg"]["status"] == "failed"
    assert rows["bad.jpg"]["archive"] is None
    assert "empty" in rows["bad.jpg"]["error"]


def test_jobs_filters_by_status_and_prints_a_table(folders, drop):
    drop(folders["watch"], "good.jpg")
    drop(folders["watch"], "bad.jpg", b"")
    run_command("sweep", "--inline")
    table = run_command("jobs", "--status", "failed")
    assert "bad.jpg" in table
    assert "good.jpg" not in table


def test_sweep_with_the_broker_down_says_what_became_of_the_images(folders, drop):
    drop(folders["watch"], "a.jpg")
    # Nothing listens on port 1.
    with celery_broker("redis://127.0.0.1:1/0"), pytest.raises(CommandError) as raised:
        run_command("sweep", "--no-wait")
    assert "the broker does not answer" in str(raised.value)
    assert "the 1 image(s) stay claimed" in str(raised.value)
    assert Image.objects.get().status == Image.Status.PENDING  # a later sweep queues it


def test_jobs_refuses_a_negative_limit(folders):
    with pytest.raises(CommandError, match="--limit"):
        run_command("jobs", "--limit", "-3")

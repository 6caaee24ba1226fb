"""The image's state machine: every transition is a conditional update on the database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.db.models.functions import Now
from django.utils import timezone

from jobs import models
from jobs.models import Image
from jobs.storage import FileIdentity

pytestmark = pytest.mark.django_db


def pending(name: str = "a.jpg", **fields: object) -> Image:
    values = {
        "folder": "/inbox",
        "name": name,
        "source_path": f"/inbox/{name}",
        "file_size": 10,
        "mtime_ns": 1,
        "sizes": ["64x64"],
        "sizes_key": "64x64",
        **fields,
    }
    return Image.objects.create(**values)


def started(name: str = "a.jpg", **fields: object) -> Image:
    """An image in processing, loaded as the run that started it sees it."""
    image = pending(name, **fields)
    token = Image.objects.start(image.id, "task-1", worker="host:1")
    assert token is not None
    image = Image.objects.get(id=image.id)
    assert image.token == token
    return image


def as_another_run(image: Image) -> Image:
    """The same row as a run holding some other token sees it."""
    other = Image.objects.get(id=image.id)
    other.token = uuid.uuid4()
    return other


def expire(image: Image) -> None:
    Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=1))


def row(image: Image) -> dict[str, object]:
    return Image.objects.filter(id=image.id).values().get()


RESULT = {
    "archive": "archives/1-a.zip",
    "archive_size": 123,
    "width": 64,
    "height": 48,
    "format": "JPEG",
    "thumbnails": {"64x64": [64, 48]},
}


def test_image_start_gives_the_run_a_token_and_a_lease_by_the_database_clock():
    image = pending()
    token = Image.objects.start(image.id, "task-1", worker="host:1")
    assert isinstance(token, uuid.UUID)
    image.refresh_from_db()
    assert image.status == Image.Status.PROCESSING
    assert image.token == token
    assert image.attempts == 1
    assert (image.task_id, image.worker) == ("task-1", "host:1")
    assert image.started_at is not None
    assert image.lease_until > image.started_at
    assert Image.objects.lease_expired().count() == 0


def test_image_start_twice_gives_one_run():
    image = pending()
    assert Image.objects.start(image.id) is not None
    assert Image.objects.start(image.id) is None
    assert row(image)["attempts"] == 1


def test_image_start_of_the_next_run_gets_a_new_token_and_counts_the_attempt():
    image = started()
    expire(image)
    assert image.retry(max_attempts=3) == Image.Status.PENDING
    token = Image.objects.start(image.id)
    assert token not in (None, image.token)
    assert row(image)["attempts"] == 2


def test_image_renew_extends_the_lease_of_the_run_that_owns_it():
    image = started()
    expire(image)
    assert Image.objects.lease_expired().filter(id=image.id).exists()
    assert Image.objects.renew(image.id, image.token)
    assert not Image.objects.lease_expired().filter(id=image.id).exists()


def test_image_renew_with_a_wrong_token_changes_nothing():
    image = started()
    expire(image)
    before = row(image)
    assert not Image.objects.renew(image.id, uuid.uuid4())
    assert row(image) == before


def test_image_renew_after_the_run_finished_changes_nothing():
    image = started()
    assert image.mark_failed("broken")
    before = row(image)
    assert not Image.objects.renew(image.id, image.token)
    assert row(image) == before


@pytest.mark.parametrize(
    "transition",
    [
        lambda image, first: image.mark_done(**RESULT),
        lambda image, first: image.mark_failed("no"),
        lambda image, first: image.release_changed("changed"),
        lambda image, first: image.mark_duplicate(first),
        lambda image, first: image.retry(max_attempts=3),
    ],
    ids=["done", "failed", "release_changed", "duplicate", "retry"],
)
def test_image_transition_with_a_wrong_token_changes_nothing(transition):
    first = pending("first.jpg", status=Image.Status.DONE, sha256="x")
    image = started()
    expire(image)  # even with its lease run out, only its own token may move it
    before = row(image)
    stale = as_another_run(image)
    assert not transition(stale, first)
    assert row(image) == before
    assert not stale.is_current_run()
    assert image.is_current_run()


def test_image_mark_done_records_the_result_and_ends_the_lease():
    image = started()
    assert image.mark_done(**RESULT)
    assert image.status == Image.Status.DONE
    stored = row(image)
    assert stored["status"] == Image.Status.DONE
    assert {name: stored[name] for name in RESULT} == RESULT
    assert stored["finished_at"] >= stored["started_at"]
    assert stored["lease_until"] is None
    assert not image.mark_done(**RESULT), "a second done is no transition"


def test_image_mark_done_of_content_done_already_raises_integrity_error():
    pending("first.jpg", status=Image.Status.DONE, sha256="same", archive="archives/first.zip")
    image = started(sha256="same")
    with pytest.raises(IntegrityError):
        image.mark_done(**RESULT)
    assert row(image)["status"] == Image.Status.PROCESSING


def test_image_mark_done_of_content_whose_zip_retention_deleted_makes_a_new_archive():
    first = pending("first.jpg", status=Image.Status.DONE, sha256="same", archive="")
    image = started(sha256="same")
    assert not image.mark_duplicate(first), "no zip to share"
    assert image.mark_done(**RESULT)
    assert row(image)["archive"] == RESULT["archive"]


def test_image_mark_failed_and_release_changed():
    failed = started("a.jpg")
    assert failed.mark_failed("broken")
    assert (row(failed)["status"], row(failed)["error"]) == (Image.Status.FAILED, "broken")
    assert row(failed)["in_folder"]
    changed = started("b.jpg")
    assert changed.release_changed("it changed")
    assert row(changed)["status"] == Image.Status.FAILED
    assert not row(changed)["in_folder"], "its path is free for a new claim"


def test_image_mark_duplicate_only_while_the_first_is_done():
    first = pending("first.jpg", status=Image.Status.DONE, sha256="same", archive="archives/1.zip")
    image = started(sha256="same", archive="archives/old.zip")
    Image.objects.filter(id=first.id).update(status=Image.Status.PENDING)  # reprocessed
    assert not image.mark_duplicate(first)
    assert image.is_current_run()
    Image.objects.filter(id=first.id).update(status=Image.Status.DONE)
    assert image.mark_duplicate(first)
    stored = row(image)
    assert (stored["status"], stored["duplicate_of_id"]) == (Image.Status.DUPLICATE, first.id)
    assert stored["archive"] == ""


def test_image_retry_leaves_a_run_whose_lease_is_live():
    image = started()
    before = row(image)
    assert image.retry(max_attempts=3) is None
    assert row(image) == before


def test_image_retry_takes_over_a_run_whose_lease_ran_out():
    image = started()
    expire(image)
    dead_run = Image.objects.get(id=image.id)
    assert image.retry(max_attempts=3) == Image.Status.PENDING
    stored = row(image)
    assert stored["status"] == Image.Status.PENDING
    assert stored["attempts"] == 1
    assert stored["lease_until"] is None
    # The dead run wakes up: nothing it does is recorded.
    assert not dead_run.mark_done(**RESULT)
    assert not Image.objects.renew(image.id, dead_run.token)
    assert row(image)["status"] == Image.Status.PENDING


def test_image_retry_after_the_run_renewed_its_lease_changes_nothing():
    image = started()
    expire(image)
    seen_by_a_sweep = Image.objects.lease_expired().get(id=image.id)
    assert Image.objects.renew(image.id, image.token)  # the run was only slow
    assert seen_by_a_sweep.retry(max_attempts=3) is None
    assert row(image)["status"] == Image.Status.PROCESSING


def test_image_retry_by_two_sweeps_happens_once():
    image = started()
    expire(image)
    one, two = Image.objects.get(id=image.id), Image.objects.get(id=image.id)
    assert one.retry(max_attempts=3) == Image.Status.PENDING
    Image.objects.start(image.id)  # the next run is already going
    expire(image)
    assert two.retry(max_attempts=3) is None, "its token is the first run's"
    assert row(image)["status"] == Image.Status.PROCESSING


@pytest.mark.parametrize(("attempts", "max_attempts"), [(3, 3), (4, 3), (1, 1)])
def test_image_retry_fails_the_file_at_max_attempts(attempts, max_attempts):
    image = pending(attempts=attempts - 1)
    Image.objects.start(image.id)
    expire(image)
    image = Image.objects.get(id=image.id)
    assert image.attempts == attempts
    assert image.retry(max_attempts) == Image.Status.FAILED
    stored = row(image)
    assert stored["status"] == Image.Status.FAILED
    assert f"{attempts} times" in stored["error"]
    assert stored["finished_at"] is not None


def test_image_retry_below_max_attempts_queues_it_again():
    image = pending(attempts=1)
    Image.objects.start(image.id)
    expire(image)
    assert Image.objects.get(id=image.id).retry(max_attempts=3) == Image.Status.PENDING


def test_image_reclaim_puts_a_final_image_back_to_pending_without_its_last_run():
    image = started()
    assert image.mark_failed("broken")
    Image.objects.filter(id=image.id).update(in_folder=False, original_path="/kept/a.jpg")
    image = Image.objects.get(id=image.id)
    assert image.reclaim(["32x32"], FileIdentity(20, 2, 7, 9))
    stored = row(image)
    assert stored["status"] == Image.Status.PENDING
    assert stored["source_path"] == "/kept/a.jpg"
    assert (stored["file_size"], stored["mtime_ns"], stored["sizes"]) == (20, 2, ["32x32"])
    assert (stored["device"], stored["inode"]) == (7, 9)
    assert (stored["attempts"], stored["token"], stored["lease_until"]) == (0, None, None)
    assert (stored["error"], stored["started_at"], stored["finished_at"]) == ("", None, None)
    assert Image.objects.start(image.id) is not None


def test_image_reclaim_refuses_what_changed_since_it_was_read():
    image = started()
    assert image.mark_failed("broken")
    Image.objects.filter(id=image.id).update(in_folder=False, original_path="/kept/a.jpg")
    seen = Image.objects.get(id=image.id)
    # Someone else, first:
    assert Image.objects.get(id=image.id).reclaim(["32x32"], FileIdentity(20, 2, 7, 9))
    assert not seen.reclaim(["16x16"], FileIdentity(20, 2, 7, 9))
    assert row(image)["sizes"] == ["32x32"]


def test_image_reclaim_refuses_an_image_whose_zip_a_duplicate_uses():
    first = pending(
        "first.jpg", status=Image.Status.DONE, in_folder=False, original_path="/kept/f.jpg"
    )
    pending("second.jpg", status=Image.Status.DUPLICATE, duplicate_of=first)
    assert not first.reclaim(["32x32"], FileIdentity(20, 2, 7, 9))
    assert row(first)["status"] == Image.Status.DONE


def test_image_requeue_lost_touches_pending_images_only_and_each_once():
    waiting = pending("a.jpg")
    running = started("b.jpg")
    Image.objects.update(queued_at=timezone.now() - timedelta(hours=1))
    before = row(running)
    cutoff = timezone.now() - timedelta(seconds=60)  # queued longer ago than REQUEUE_AFTER
    assert Image.objects.requeue_lost([waiting.id, running.id], queued_before=cutoff) == [
        waiting.id
    ]
    assert row(running) == before
    # A second sweep that chose the same image by the same cutoff: it was queued again since.
    assert Image.objects.requeue_lost([waiting.id], queued_before=cutoff) == []


def test_image_requeue_lost_marks_a_large_lost_backlog_batch_by_batch(monkeypatch):
    monkeypatch.setattr(models, "REQUEUE_BATCH", 2)
    lost = [pending(f"{number}.jpg").id for number in range(5)]
    Image.objects.update(queued_at=timezone.now() - timedelta(hours=1))
    cutoff = timezone.now() - timedelta(seconds=60)
    assert Image.objects.requeue_lost(lost, queued_before=cutoff) == lost
    assert not Image.objects.filter(queued_at__lt=cutoff).exists()

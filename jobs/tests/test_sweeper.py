"""Finding, claiming and putting away files, on real temporary folders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import runner, storage, sweeper, tasks
from jobs.broker import queue_length
from jobs.models import Image, Sweep, SweepLock
from project.celery import app as celery_app

from .conftest import image_bytes

pytestmark = pytest.mark.django_db


def new_sweep(folder: Path, sizes: list[str] | None = None) -> Sweep:
    record, path, _labels = sweeper.start_sweep(
        str(folder), sizes or ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    assert path == folder, record.error
    return record


def run(folder: Path, sizes: list[str] | None = None) -> sweeper.SweepOutcome:
    return sweeper.sweep_folder(str(folder), sizes or ["64x64"])


def test_scan_skips_junk_hidden_and_partial_files(folders, drop):
    watch = folders["watch"]
    for name in [
        "photo.jpg",
        "sub/deeper/photo.jpg",
        ".hidden.jpg",
        "~lock.jpg",
        "big.jpg.part",
        "x.tmp",
        "dl.jpg.crdownload",
        "Thumbs.db",
        ".DS_Store",
        "__MACOSX/photo.jpg",
        # Whatever the case, as Windows writes them.
        "COPY.TMP",
        "THUMBS.DB",
        "big.JPG.Part",
        "page.jpg.download",
        "__macosx/photo.jpg",
    ]:
        drop(watch, name)
    found = storage.scan(watch, settle_seconds=0)
    assert sorted(c.name for c in found.ready) == ["photo.jpg", "sub/deeper/photo.jpg"]
    assert found.ignored == 13


def test_scan_leaves_recently_changed_files(folders, drop):
    drop(folders["watch"], "fresh.jpg")
    found = storage.scan(folders["watch"], settle_seconds=60)
    assert found.ready == []
    assert found.unstable == 1


def test_scan_waits_for_a_copied_file_even_with_an_old_mtime(folders, drop):
    # `cp -p` keeps an old mtime: the change time still says the file just arrived.
    path = drop(folders["watch"], "copied.jpg")
    os.utime(path, (0, 0))
    assert storage.scan(folders["watch"], settle_seconds=60).unstable == 1


def test_a_download_is_taken_once_and_whole_not_as_its_empty_placeholder(folders, drop):
    # Firefox saves `photo.jpg` empty at once, writes `photo.jpg.part`, then renames it over.
    placeholder = drop(folders["watch"], "photo.jpg", b"")
    part = drop(folders["watch"], "photo.jpg.part", image_bytes()[:1000])
    waiting = run(folders["watch"])
    assert (waiting.sweep.claimed, waiting.sweep.unstable) == (0, 1)
    part.write_bytes(image_bytes())
    os.rename(part, placeholder)
    done = run(folders["watch"])
    assert done.sweep.claimed == 1
    assert [(image.name, image.file_size) for image in Image.objects.all()] == [
        ("photo.jpg", len(image_bytes()))
    ]
    # An empty file with no download beside it is still taken, and fails saying why.
    drop(folders["watch"], "empty.jpg", b"")
    drop(folders["watch"], "other.jpg.part", b"")
    assert run(folders["watch"]).sweep.claimed == 1


def test_scan_takes_a_settled_file_whose_mtime_is_in_the_future(folders, drop):
    # A camera's clock set ahead, or FAT's local times read as UTC, kept by `cp -p`: the
    # file would otherwise wait, unclaimed and unrecorded, until that time comes.
    path = drop(folders["watch"], "from_the_camera.jpg")
    ahead = time.time_ns() + 10 * 3600 * 10**9
    os.utime(path, ns=(ahead, ahead))
    time.sleep(0.3)
    found = storage.scan(folders["watch"], settle_seconds=0.2)
    assert ([c.name for c in found.ready], found.unstable) == (["from_the_camera.jpg"], 0)
    # Written again: the change time still says so, whatever the mtime.
    with path.open("ab") as handle:
        handle.write(b"more")
    os.utime(path, ns=(ahead, ahead))
    assert storage.scan(folders["watch"], settle_seconds=60).unstable == 1


def test_scan_takes_a_file_renamed_in_at_once_while_it_is_unchanged(folders, tmp_path, drop):
    staged = drop(tmp_path / "staging", "whole.jpg")
    renamed = folders["watch"] / "whole.jpg"
    os.rename(staged, renamed)
    drop(folders["watch"], "written.jpg")
    arrival = storage.Arrival.of(renamed.lstat())

    found = storage.scan(folders["watch"], settle_seconds=60, arrived=[arrival])
    assert [c.name for c in found.ready] == ["whole.jpg"]
    assert found.unstable == 1  # written in place: it waits to settle
    # Seen by a watch on another host, whose mount of a network share has its own number.
    elsewhere = dataclasses.replace(arrival, device=arrival.device + 1)
    found = storage.scan(folders["watch"], settle_seconds=60, arrived=[elsewhere])
    assert [c.name for c in found.ready] == ["whole.jpg"]

    # Written again after the rename: it is no longer the file that arrived whole.
    with renamed.open("ab") as handle:
        handle.write(b"more")
    found = storage.scan(folders["watch"], settle_seconds=60, arrived=[arrival])
    assert (found.ready, found.unstable) == ([], 2)


def test_arrivals_from_a_task_argument_keep_only_five_whole_numbers():
    assert storage.Arrival.parse([[1, 2, 3, 4, 5]]) == [storage.Arrival(1, 2, 3, 4, 5)]
    assert storage.Arrival.parse(None) == []
    malformed = [[1, 2, 3, 4], [1, 2, 3, 4, "5"], [1, 2, 3, 4, True], "12345", {"a": 1}]
    assert storage.Arrival.parse([*malformed, [6, 7, 8, 9, 10]]) == [
        storage.Arrival(6, 7, 8, 9, 10)
    ]
    assert storage.Arrival.parse("not a list") == []


def test_scan_skips_excluded_subfolders(folders, drop):
    drop(folders["watch"], "a.jpg")
    drop(folders["watch"], "nested/b.jpg")
    found = storage.scan(folders["watch"], 0, exclude=[folders["watch"] / "nested"])
    assert [c.name for c in found.ready] == ["a.jpg"]


def test_run_sweep_claims_each_file_once(folders, drop):
    drop(folders["watch"], "a.jpg")
    drop(folders["watch"], "b.jpg")
    first = run(folders["watch"])
    second = run(folders["watch"])
    assert len(first.to_queue) == 2
    assert second.to_queue == []
    assert first.sweep.claimed == 2
    assert first.sweep.status == Sweep.Status.DONE
    assert second.sweep.claimed == 0
    assert Image.objects.count() == 2
    image = Image.objects.get(name="a.jpg")
    assert image.status == Image.Status.PENDING
    assert image.sizes == ["64x64"]
    assert image.source_path == str(folders["watch"] / "a.jpg")


def test_claim_of_racing_sweeps_has_one_winner(folders, drop):
    drop(folders["watch"], "a.jpg")
    ready = storage.scan(folders["watch"], 0).ready
    first, second = new_sweep(folders["watch"]), new_sweep(folders["watch"])
    # Both read the folder before either inserted: the unique claim decides.
    assert sweeper.claim(first, ready, ["64x64"])
    assert sweeper.claim(second, ready, ["64x64"]) == []
    assert Image.objects.count() == 1


def test_run_sweep_is_skipped_while_another_sweep_holds_the_folder(folders, drop):
    drop(folders["watch"], "a.jpg")
    holder = sweeper.acquire_lock(folders["watch"])
    assert holder is not None
    assert sweeper.acquire_lock(folders["watch"]) is None
    outcome = run(folders["watch"])
    assert outcome.sweep.status == Sweep.Status.SKIPPED
    assert outcome.to_queue == []
    sweeper.release_lock(folders["watch"], holder)
    assert run(folders["watch"]).sweep.claimed == 1


def test_acquire_lock_takes_over_an_expired_lock(folders):
    # A second ago: SQLite's clock (Now()) has milliseconds, Python's microseconds, so a
    # lock ending "now" by Python's was still held by SQLite's within the same millisecond.
    SweepLock.objects.create(
        folder=str(folders["watch"]), expires_at=timezone.now() - timedelta(seconds=1)
    )
    owner = sweeper.acquire_lock(folders["watch"])
    assert owner is not None
    assert SweepLock.objects.get().owner == owner


def test_a_lock_nobody_renews_is_taken_over_after_one_lease(folders, settings):
    """The sweep holding it was killed: the folder is free LEASE_SECONDS later, not after
    the time limit of a task."""
    settings.LEASE_SECONDS = 1
    dead = sweeper.acquire_lock(folders["watch"])
    assert sweeper.acquire_lock(folders["watch"]) is None, "a live lease"
    time.sleep(1.5)
    taker = sweeper.acquire_lock(folders["watch"])
    assert taker not in (None, dead)
    assert SweepLock.objects.get().owner == taker
    assert not SweepLock.renew(str(folders["watch"]), dead), "the dead sweep's token is spent"


@pytest.mark.django_db(transaction=True)
def test_a_running_sweep_keeps_its_lock_past_many_leases(folders, drop, settings, monkeypatch):
    settings.LEASE_SECONDS = 1
    drop(folders["watch"], "photo.jpg")
    scanning = threading.Event()
    real_scan = sweeper.scan

    def slow_scan(*args, **kwargs):
        scanning.set()
        time.sleep(4)  # four leases
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(sweeper, "scan", slow_scan)
    outcomes: list[sweeper.SweepOutcome] = []

    def sweep_in_a_thread() -> None:
        try:
            outcomes.append(run(folders["watch"]))
        finally:
            connection.close()

    sweeping = threading.Thread(target=sweep_in_a_thread)
    sweeping.start()
    assert scanning.wait(timeout=30)
    time.sleep(2.5)
    assert sweeper.acquire_lock(folders["watch"]) is None, "renewed while the sweep runs"
    sweeping.join(timeout=60)
    assert [outcome.sweep.claimed for outcome in outcomes] == [1]
    assert not SweepLock.objects.exists(), "released at its end"


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("relative/path", "absolute"),
        ("/etc", "outside the allowed WATCH_ROOTS"),
        ("{media}", "overlaps MEDIA_ROOT"),
        ("{root}/missing", "does not exist"),
        (42, "path string"),
    ],
)
def test_start_sweep_records_bad_folders(folders, folder, message):
    if isinstance(folder, str):
        folder = folder.format(media=folders["media"], root=folders["root"])
    record, path, _ = sweeper.start_sweep(folder, None, trigger=Sweep.Trigger.MANUAL)
    assert path is None
    assert record.status == Sweep.Status.FAILED
    assert message in record.error


def test_start_sweep_records_bad_sizes(folders):
    record, path, _ = sweeper.start_sweep(
        str(folders["watch"]), ["big"], trigger=Sweep.Trigger.SCHEDULE
    )
    assert path is None
    assert "not a size like 128x128" in record.error


def test_start_sweep_defaults_to_watch_folder_and_configured_sizes(folders, settings):
    _record, path, labels = sweeper.start_sweep(None, None, trigger=Sweep.Trigger.MANUAL)
    assert path == folders["watch"]
    assert labels == ["512x512", "256x256", "128x128"]  # normalised, as any sizes are


def claim_one(folders, drop, name: str = "a.jpg") -> Image:
    drop(folders["watch"], name)
    run(folders["watch"])
    return Image.objects.get(name=name)


def expire_lease(image: Image) -> None:
    """What a run that stopped renewing its lease leaves: a lease in the past."""
    Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=1))


def test_reconcile_requeues_an_image_whose_lease_ran_out(folders, drop):
    image = claim_one(folders, drop)
    # Its label names this very process, alive: the lease decides, not the PID.
    Image.objects.start(image.id, "task", worker=sweeper.this_worker())
    expire_lease(image)
    assert run(folders["watch"]).to_queue == [image.id]
    image.refresh_from_db()
    assert image.status == Image.Status.PENDING
    assert image.attempts == 1


def test_reconcile_leaves_a_run_whose_lease_is_live(folders, drop):
    image = claim_one(folders, drop)
    # Its label names a PID that is gone on this host: the lease decides, not the PID.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    token = Image.objects.start(
        image.id, "task", worker=f"{sweeper.socket.gethostname()}:{dead.pid}"
    )
    Image.objects.filter(id=image.id).update(started_at=timezone.now() - timedelta(days=1))
    assert run(folders["watch"]).to_queue == []
    image.refresh_from_db()
    assert image.status == Image.Status.PROCESSING
    assert image.token == token


def test_reconcile_fails_a_poison_file_after_max_attempts(folders, drop, settings):
    settings.MAX_ATTEMPTS = 2
    image = claim_one(folders, drop)
    Image.objects.filter(id=image.id).update(attempts=1)
    Image.objects.start(image.id, "task", worker="elsewhere:1")
    expire_lease(image)
    run(folders["watch"])
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert "2 times" in image.error
    assert not image.in_folder
    kept = Path(image.original_path)
    assert kept.is_file()
    assert kept.is_relative_to(folders["media"] / "failed")
    assert "2 times" in kept.with_name(kept.name + ".error.txt").read_text()


def test_reconcile_requeues_pending_images_whose_message_was_lost(folders, drop, settings):
    image = claim_one(folders, drop)
    assert run(folders["watch"]).to_queue == []
    Image.objects.filter(id=image.id).update(
        queued_at=timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + 1)
    )
    assert run(folders["watch"]).to_queue == [image.id]


def test_a_backlog_is_not_queued_again_but_a_lost_message_is(folders, drop, settings, broker):
    # Three images waiting long past REQUEUE_AFTER, each with its message in a real Redis.
    images = [claim_one(folders, drop, f"{number}.jpg") for number in range(3)]
    long_ago = timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + 60)
    for age, image in enumerate(images):
        Image.objects.filter(id=image.id).update(queued_at=long_ago - timedelta(seconds=age))
    tasks.queue_images([image.id for image in images])
    assert queue_length() == 3

    def sweep() -> list[int]:
        return sweeper.sweep_folder(
            str(folders["watch"]), ["64x64"], requeue=tasks.requeue_policy()
        ).to_queue

    # Nothing is lost: no second message, and each image's wait stays its own (what
    # /metrics and the dashboard report as the oldest wait).
    assert sweep() == []
    assert sweep() == []
    assert queue_length() == 3
    oldest = Image.objects.order_by("queued_at").first()
    assert oldest.queued_at == long_ago - timedelta(seconds=2)
    # One message is lost: as many images as the queue lacks are queued again, oldest first.
    with broker_client() as client:
        assert client.rpop(settings.IMAGE_QUEUE)
    assert sweep() == [images[2].id]
    tasks.queue_images([images[2].id])
    assert sweep() == []


def test_a_lost_message_is_made_up_for_by_any_folders_sweep(folders, drop, settings, broker):
    # In one folder, the oldest waiting image of all, whose message a worker took and lost;
    # in the watch folder a backlog of three, their messages waiting in the queue.
    drop(folders["other"], "lost.jpg")
    (lost,) = run(folders["other"]).to_queue
    backlog = [claim_one(folders, drop, f"{number}.jpg").id for number in range(3)]
    tasks.queue_images(backlog)
    long_ago = timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + 60)
    Image.objects.filter(id__in=backlog).update(queued_at=long_ago)
    Image.objects.filter(id=lost).update(queued_at=long_ago - timedelta(seconds=10))

    # The queue lacks one message: the busy folder's sweep, whichever runs first, makes up
    # for the lost one, not for an image of its own whose message waits.
    busy = sweeper.sweep_folder(str(folders["watch"]), ["64x64"], requeue=tasks.requeue_policy())
    assert busy.to_queue == [lost]
    tasks.queue_images(busy.to_queue)
    assert run(folders["other"]).to_queue == []
    assert queue_length() == 4


@contextlib.contextmanager
def broker_client() -> Iterator[Any]:
    """A Redis client of the app's broker, with this instance's key prefix."""
    with celery_app.connection_for_write() as connection:
        yield connection.default_channel.client


def test_reconcile_puts_away_originals_of_finished_images(folders, drop):
    image = claim_one(folders, drop)
    original = Path(image.source_path).read_bytes()
    # A crash after "done" was committed, before the original moved.
    Image.objects.filter(id=image.id).update(status=Image.Status.DONE)
    run(folders["watch"])
    image.refresh_from_db()
    assert not image.in_folder
    assert not Path(image.source_path).exists()
    assert Path(image.original_path).read_bytes() == original


def test_put_original_away_is_idempotent_after_a_crash_mid_move(folders, drop):
    image = claim_one(folders, drop)
    image.status = Image.Status.DONE
    destination = storage.kept_path(image)
    destination.parent.mkdir(parents=True)
    os.rename(image.source_path, destination)  # moved, but the database never heard
    sweeper.put_original_away(image)
    image.refresh_from_db()
    assert image.original_path == str(destination)
    assert not image.in_folder


def test_a_new_file_at_a_finished_path_is_claimed_anew(folders, drop):
    image = claim_one(folders, drop)
    image.status = Image.Status.DONE
    sweeper.put_original_away(image)
    drop(folders["watch"], "a.jpg")
    assert len(run(folders["watch"]).to_queue) == 1
    assert Image.objects.filter(name="a.jpg").count() == 2


def test_kept_path_truncates_very_long_names(folders, drop):
    image = claim_one(folders, drop, name="é" * 120 + ".jpg")
    path = storage.kept_path(image)
    assert len(path.name.encode()) <= 255
    assert path.suffix == ".jpg"


def test_reconcile_removes_the_partial_archive_of_the_dead_run_only(folders, drop):
    image = claim_one(folders, drop)
    dead = Image.objects.start(image.id, "task", worker="elsewhere:1")
    expire_lease(image)
    destination = storage.archive_path(image)
    destination.parent.mkdir(parents=True)
    partial = destination.parent / f".{destination.name}.{dead.hex}.k2j3h4.part"
    partial.write_bytes(b"half a zip")
    # Another run of the same image, writing right now, and another image's.
    live = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.x7y8z9.part"
    live.write_bytes(b"a live run's half zip")
    other = destination.parent / ".99-other.zip.abc.part"
    other.write_bytes(b"someone else's")
    assert run(folders["watch"]).to_queue == [image.id]
    assert not partial.exists()
    assert live.exists()
    assert other.exists()


def test_recover_unswept_requeues_an_upload_whose_worker_died(folders):
    upload = folders["media"] / "uploads" / "x" / "up.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"image bytes")
    image = Image.objects.create(
        source=Image.Source.UPLOAD,
        folder=str(upload.parent),
        name="up.jpg",
        source_path=str(upload),
        file_size=11,
        mtime_ns=0,
        sizes=["64x64"],
        sizes_key="64x64",
    )
    Image.objects.start(image.id, "task", worker="elsewhere:1")
    expire_lease(image)
    assert sweeper.recover_unswept().requeue == [image.id]
    assert Image.objects.get(id=image.id).status == Image.Status.PENDING


def test_a_lost_upload_is_queued_again_on_the_upload_queue_and_a_waiting_one_is_not(
    folders, settings, broker
):
    def upload(name: str, age: float) -> Image:
        path = folders["media"] / "uploads" / "x" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"image bytes")
        return Image.objects.create(
            source=Image.Source.UPLOAD,
            folder=str(path.parent),
            name=name,
            source_path=str(path),
            file_size=11,
            mtime_ns=0,
            sizes=["64x64"],
            sizes_key="64x64",
            queued_at=timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + age),
        )

    # The lost message is the oldest image's, as a backlog's order makes it.
    waiting, lost = upload("waiting.jpg", 5), upload("lost.jpg", 10)
    tasks.queue_images([waiting.id], uploaded={waiting.id})
    # The upload's message waits in its own queue: it is held, not lost.
    repairs = sweeper.recover_unswept(tasks.requeue_policy())
    assert (repairs.requeue, repairs.uploads) == ([lost.id], {lost.id})
    tasks.queue_images(repairs.requeue, uploaded=repairs.uploads)
    assert (queue_length(settings.UPLOAD_QUEUE), queue_length(settings.IMAGE_QUEUE)) == (2, 0)
    assert sweeper.recover_unswept(tasks.requeue_policy()).requeue == []


def test_recover_unswept_requeues_a_lost_reprocess_and_leaves_fresh_work(folders, drop, settings):
    kept = folders["media"] / "originals" / "a.jpg"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"image bytes")
    common = {"file_size": 11, "mtime_ns": 0, "sizes": ["64x64"], "sizes_key": "64x64"}
    lost = Image.objects.create(
        name="a.jpg",
        folder="/gone",
        source_path=str(kept),
        original_path=str(kept),
        in_folder=False,
        queued_at=timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + 5),
        **common,
    )
    Image.objects.create(
        name="b.jpg", folder="/gone", source_path=str(kept), in_folder=False, **common
    )
    assert sweeper.recover_unswept().requeue == [lost.id]


def test_recover_unswept_repairs_folders_no_schedule_sweeps_and_leaves_the_others(folders, drop):
    # A folder swept by hand ("Sweep now", `manage.py sweep --folder`): no schedule's sweep
    # comes back to it, so after its worker died only jobs.recover can retry its image.
    drop(folders["other"], "by-hand.jpg")
    (by_hand,) = run(folders["other"]).to_queue
    # The watch folder has its schedule: its sweep repairs its own images.
    PeriodicTask.objects.create(
        name="sweep-watch-folder",
        task=sweeper.SWEEP_TASK,
        interval=IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS),
        kwargs=json.dumps({"folder": str(folders["watch"])}),
    )
    scheduled = claim_one(folders, drop, "scheduled.jpg")
    for image_id in (by_hand, scheduled.id):
        Image.objects.start(image_id, "task", worker="gone:1")
        expire_lease(Image.objects.get(id=image_id))

    assert sweeper.recover_unswept().requeue == [by_hand]
    assert Image.objects.get(id=by_hand).status == Image.Status.PENDING
    assert Image.objects.get(id=scheduled.id).status == Image.Status.PROCESSING
    assert run(folders["watch"]).to_queue == [scheduled.id]


def test_run_sweep_leaves_names_the_database_cannot_hold_and_says_so(folders, drop):
    drop(folders["watch"], "good.jpg")
    bad = os.fsencode(folders["watch"]) + b"/caf\xe9.jpg"
    with open(bad, "wb") as handle:
        handle.write(b"latin-1 name")
    outcome = run(folders["watch"])
    assert [image.name for image in Image.objects.all()] == ["good.jpg"]
    assert outcome.sweep.status == Sweep.Status.DONE
    assert "not valid UTF-8" in outcome.sweep.error
    assert "caf\\xe9.jpg" in outcome.sweep.error
    assert os.path.exists(bad)


def test_put_original_away_leaves_a_file_replaced_after_its_claim(folders, drop):
    image = claim_one(folders, drop)
    drop(folders["watch"], "a.jpg", b"a different, newer file")
    image.status = Image.Status.DONE
    sweeper.put_original_away(image)
    image.refresh_from_db()
    assert image.original_path == ""
    assert not image.in_folder
    assert (folders["watch"] / "a.jpg").read_bytes() == b"a different, newer file"
    assert len(run(folders["watch"]).to_queue) == 1, "the new file is claimed anew"


def test_put_original_away_by_two_hands_at_once_keeps_the_record_right(folders, drop):
    image = claim_one(folders, drop)
    image.status = Image.Status.DONE
    destination = storage.kept_path(image)
    destination.parent.mkdir(parents=True)
    # The worker renamed it a moment ago; this (the sweep's repair) arrives second.
    os.rename(image.source_path, destination)
    sweeper.put_original_away(image)
    image.refresh_from_db()
    assert image.original_path == str(destination)
    assert destination.is_file()


def test_run_sweep_does_not_claim_a_file_moved_away_while_it_listed(folders, drop, monkeypatch):
    image = claim_one(folders, drop)
    Image.objects.filter(id=image.id).update(status=Image.Status.DONE)
    real_scan = sweeper.scan

    def scan_then_finish_the_image(*args, **kwargs):
        found = real_scan(*args, **kwargs)  # still lists a.jpg
        image.refresh_from_db()
        sweeper.put_original_away(image)  # a worker finishing it during the listing
        return found

    monkeypatch.setattr(sweeper, "scan", scan_then_finish_the_image)
    monkeypatch.setattr(sweeper, "reconcile", lambda folder, requeue=None: sweeper.Repairs())
    assert run(folders["watch"]).to_queue == []
    assert Image.objects.count() == 1


def test_reconcile_removes_the_zip_a_dead_run_renamed_into_place_the_day_before(folders, drop):
    image = claim_one(folders, drop)
    # Queued just before midnight; its run renamed its zip into place and died before the
    # database heard. Retried today, the next run writes under today's folder.
    Image.objects.filter(id=image.id).update(queued_at=timezone.now() - timedelta(days=1))
    Image.objects.start(image.id, "task", worker="elsewhere:1")
    expire_lease(image)
    dead = Image.objects.get(id=image.id)
    renamed = storage.archive_path(dead)
    renamed.parent.mkdir(parents=True)
    renamed.write_bytes(b"a whole zip nobody recorded")
    assert run(folders["watch"]).to_queue == [image.id]
    assert not renamed.exists()


def zip_of_a_dead_first_run(folders, drop) -> tuple[Image, Path]:
    """A claimed image whose first run died after renaming its zip into place."""
    image = claim_one(folders, drop)
    Image.objects.start(image.id, "task", worker="elsewhere:1")
    expire_lease(image)
    renamed = storage.archive_path(Image.objects.get(id=image.id))
    renamed.parent.mkdir(parents=True)
    renamed.write_bytes(b"a whole zip, of the name the next run writes")
    return image, renamed


def test_reconcile_leaves_the_zip_the_retried_run_replaces(folders, drop):
    image, renamed = zip_of_a_dead_first_run(folders, drop)
    assert run(folders["watch"]).to_queue == [image.id]
    assert renamed.exists(), "the next run may be writing it by then"


@pytest.mark.parametrize("ending", [Image.Status.DUPLICATE, Image.Status.FAILED])
def test_a_retried_run_that_makes_no_zip_removes_the_one_its_dead_run_left(folders, drop, ending):
    image, renamed = zip_of_a_dead_first_run(folders, drop)
    assert run(folders["watch"]).to_queue == [image.id]
    if ending == Image.Status.DUPLICATE:
        # The same content, dropped twice, was done by the other copy meanwhile.
        drop(folders["other"], "copy.jpg")
        (copy,) = run(folders["other"]).to_queue
        assert runner.process_image(copy) == Image.Status.DONE
    else:
        # Someone took the stuck file out of the folder.
        (folders["watch"] / "a.jpg").unlink()
    assert runner.process_image(image.id) == ending
    assert not renamed.exists(), "no record names it: nothing would ever delete it"

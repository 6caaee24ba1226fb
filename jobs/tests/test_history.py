"""Quiet history: sweeps that found nothing leave no record, only a count on their schedule."""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult

from jobs import sweeper
from jobs.models import Image, ScheduleActivity, Sweep, SweepLock
from jobs.tasks import recover

from .conftest import image_bytes
from .processes import wait_for

QUIET_TASKS = ["jobs.sweep_folder", "jobs.recover", "jobs.apply_retention"]


def scheduled(folder, name: str = "every second") -> sweeper.SweepOutcome:
    return sweeper.sweep_folder(str(folder), ["64x64"], schedule_name=name)


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_that_finds_nothing_leaves_only_a_count(folders):
    first = scheduled(folders["watch"])
    second = scheduled(folders["watch"])
    assert not first.recorded
    assert not second.recorded
    assert not Sweep.objects.exists()
    assert not SweepLock.objects.exists()
    activity = ScheduleActivity.objects.get(schedule_name="every second")
    assert activity.idle_sweeps == 2
    assert activity.last_idle_at == activity.swept_at
    assert activity.last_found is None
    assert first.summary()["sweep"] is None


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_that_claims_is_recorded_as_its_last_find(folders, drop):
    scheduled(folders["watch"])
    drop(folders["watch"], "a.jpg")
    outcome = scheduled(folders["watch"])
    assert outcome.recorded
    assert outcome.summary()["sweep"] == outcome.sweep.id
    assert Sweep.objects.get().claimed == 1
    activity = ScheduleActivity.objects.get()
    assert (activity.idle_sweeps, activity.last_found_id) == (1, outcome.sweep.id)
    assert activity.swept_at > activity.last_idle_at


@pytest.mark.django_db
def test_a_schedule_tells_of_names_left_in_place_once_not_every_sweep(folders, drop):
    bad = os.fsencode(folders["watch"]) + b"/caf\xe9.jpg"
    with open(bad, "wb") as handle:
        handle.write(b"latin-1 name")
    told = scheduled(folders["watch"])
    assert told.recorded
    assert "caf\\xe9.jpg" in told.sweep.error
    # The same note again, with another schedule's sweeps of the folder in between.
    scheduled(folders["watch"], name="another")
    assert not scheduled(folders["watch"]).recorded
    assert not scheduled(folders["watch"]).recorded
    # A new file claimed is news, told with the note; a second name left, a new note.
    drop(folders["watch"], "good.jpg")
    assert scheduled(folders["watch"]).recorded
    with open(os.fsencode(folders["watch"]) + b"/na\xefve.jpg", "wb") as handle:
        handle.write(b"another")
    assert scheduled(folders["watch"]).recorded
    assert not scheduled(folders["watch"]).recorded
    assert Sweep.objects.filter(schedule_name="every second").count() == 3


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_that_only_repairs_is_recorded(folders, drop, settings):
    drop(folders["watch"], "a.jpg")
    claimed = scheduled(folders["watch"]).sweep
    image = Image.objects.get()
    # Its message was lost long ago: the next sweep queues it again.
    stale = timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER + 1)
    Image.objects.filter(id=image.id).update(queued_at=stale)
    requeued = scheduled(folders["watch"])
    assert requeued.recorded
    assert requeued.to_queue == [image.id]
    # Finished, but the original was never moved (a crash): the next sweep puts it away.
    Image.objects.filter(id=image.id).update(status=Image.Status.DONE, archive="x.zip")
    settled = scheduled(folders["watch"])
    assert settled.recorded
    assert settled.settled == 1
    assert settled.to_queue == []
    assert Sweep.objects.count() == 3
    assert ScheduleActivity.objects.get().idle_sweeps == 0
    assert {claimed.id, requeued.sweep.id, settled.sweep.id} == set(
        Sweep.objects.values_list("id", flat=True)
    )


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_seeing_only_a_changing_file_is_idle(folders, drop, settings):
    settings.SETTLE_SECONDS = 60
    drop(folders["watch"], "arriving.jpg")
    outcome = scheduled(folders["watch"])
    assert outcome.sweep.unstable == 1
    assert not outcome.recorded
    assert not Sweep.objects.exists()


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_skipped_for_a_running_sweep_is_idle(folders):
    assert sweeper.acquire_lock(folders["watch"]) is not None
    outcome = scheduled(folders["watch"])
    assert outcome.sweep.status == Sweep.Status.SKIPPED
    assert not outcome.recorded
    assert not Sweep.objects.exists()
    assert ScheduleActivity.objects.get().idle_sweeps == 1


@pytest.mark.django_db
def test_sweep_folder_of_a_schedule_with_bad_arguments_is_recorded_as_failed(folders):
    with pytest.raises(sweeper.SweepArgumentsError, match="outside the allowed WATCH_ROOTS"):
        sweeper.sweep_folder("/etc", None, schedule_name="typo")
    assert Sweep.objects.get().status == Sweep.Status.FAILED
    activity = ScheduleActivity.objects.get(schedule_name="typo")
    assert activity.swept_at is not None
    assert (activity.idle_sweeps, activity.last_found) == (0, None)


@pytest.mark.django_db
def test_sweep_folder_asked_for_by_hand_is_recorded_even_when_idle(folders, admin_client):
    outcome = sweeper.sweep_folder(str(folders["watch"]), None, task_id="by-hand")
    assert outcome.recorded
    assert Sweep.objects.get().trigger == Sweep.Trigger.MANUAL
    assert not ScheduleActivity.objects.exists()
    # The "sweep now" progress page reads it by task id, and can say "nothing to do".
    status = admin_client.get(reverse("jobs:sweep-by-task", args=["by-hand"])).json()
    assert (status["over"], status["total"], status["status"]) == (True, 0, Sweep.Status.DONE)


@pytest.mark.django_db
def test_work_is_stalled_counts_idle_sweeps_as_a_live_worker(folders):
    window = timedelta(minutes=5)
    assert sweeper.work_is_stalled(window, beat_running=True)
    scheduled(folders["watch"])
    assert not Sweep.objects.exists()
    assert not sweeper.work_is_stalled(window, beat_running=True)


def sweep_ids(admin_client, query: str) -> set[int]:
    response = admin_client.get(reverse("admin:jobs_sweep_changelist") + query)
    assert response.status_code == 200
    return {row.id for row in response.context["cl"].result_list}


@pytest.mark.django_db
def test_sweep_outcome_filter_tells_found_idle_and_failed_apart(admin_client, folders):
    def record(status: str, **counts: int) -> int:
        return Sweep.objects.create(folder="/f", trigger="schedule", status=status, **counts).id

    found = record(Sweep.Status.DONE, claimed=3)
    idle = record(Sweep.Status.DONE)  # recorded before idle sweeps were counted instead
    repaired = record(Sweep.Status.DONE, requeued=2)
    skipped = record(Sweep.Status.SKIPPED)
    failed = record(Sweep.Status.FAILED)
    held = record(Sweep.Status.HELD)
    assert sweep_ids(admin_client, "?outcome=found") == {found}
    assert sweep_ids(admin_client, "?outcome=idle") == {idle, repaired, skipped}
    assert sweep_ids(admin_client, "?outcome=failed") == {failed}
    assert sweep_ids(admin_client, "") == {found, idle, repaired, skipped, failed, held}
    page = admin_client.get(reverse("admin:jobs_sweep_changelist")).content.decode()
    assert "By outcome" in page
    assert re.search(r"found files\s*\(1\)", page)  # facets count


@pytest.mark.django_db
def test_schedules_show_idle_sweeps_and_last_run_on_the_list_and_dashboard(
    admin_client, folders, drop, settings
):
    settings.KEEP_ORIGINALS_DAYS, settings.KEEP_ARCHIVES_DAYS = 30, 0
    settings.IDLE_SWEEP_DAYS, settings.MIN_FREE_MB = 7, 1
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="every second", task="jobs.sweep_folder", interval=every)
    PeriodicTask.objects.create(name="idle one", task="jobs.sweep_folder", interval=every)
    for _ in range(3):
        scheduled(folders["watch"])
    drop(folders["watch"], "a.jpg")
    found = scheduled(folders["watch"]).sweep
    scheduled(folders["watch"])  # idle again: 4 in all
    swept_at = timezone.localtime(ScheduleActivity.objects.get().swept_at)

    listing = admin_client.get(reverse("admin:django_celery_beat_periodictask_changelist"))
    assert f"4 last run {swept_at:%-d %b %H:%M:%S}" in text(listing.content.decode())
    assert "0 last run never" in text(listing.content.decode())  # the one that never ran

    dashboard = admin_client.get(reverse("dashboard")).content.decode()
    schedules = dashboard.split('id="schedules"')[1].split("</table>")[0]
    rows = [text(row) for row in schedules.split("<tr>")[2:]]
    assert rows[0].startswith("every second ")
    assert "never" not in rows[0]
    assert " 4 " in rows[0]
    assert f"#{found.id} ," in rows[0]
    assert reverse("admin:jobs_sweep_change", args=[found.id]) in schedules
    assert rows[1] == "idle one never 0 — —"
    retention = text(dashboard.split('id="retention"')[1].split("</table>")[0])
    assert "kept originals (KEEP_ORIGINALS_DAYS) 30 days" in retention
    assert "archives (KEEP_ARCHIVES_DAYS) forever" in retention
    assert "task results (RESULT_EXPIRES_DAYS) 30 days" in retention
    assert "idle sweep records (IDLE_SWEEP_DAYS) 7 days" in retention
    assert "(MIN_FREE_MB) 1 MB free; now" in retention
    assert "held back" not in retention


def text(html: str) -> str:
    """What a person reads: the tags gone, the spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def results_of(names: list[str]) -> list[str]:
    return list(TaskResult.objects.filter(task_name__in=names).values_list("task_name", flat=True))


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_idle_sweeps_through_worker_and_beat_leave_no_rows_until_a_file_comes(system, folders):
    system.worker()
    system.beat()
    activity = wait_for(
        lambda: ScheduleActivity.objects.filter(schedule_name="sweep-watch-folder").first(),
        what="beat's first sweep",
    )
    # About ten seconds of an empty folder: one sweep a second, and jobs.recover once.
    wait_for(
        lambda: re.search(r"Task jobs\.recover\[[^\]]+\] succeeded", system.logs()),
        timeout=30,
        what="jobs.recover to run",
    )
    later = wait_for(
        lambda: ScheduleActivity.objects.filter(
            schedule_name="sweep-watch-folder", idle_sweeps__gte=activity.idle_sweeps + 8
        ).first(),
        what="more idle sweeps",
    )
    assert later.swept_at > activity.swept_at
    assert later.last_idle_at == later.swept_at
    assert not Sweep.objects.exists()
    assert results_of(QUIET_TASKS) == []
    # Task results past RESULT_EXPIRES_DAYS go by Celery's own task, which beat now runs.
    cleanup = PeriodicTask.objects.get(name="celery.backend_cleanup")
    assert (cleanup.enabled, cleanup.crontab.hour, cleanup.crontab.minute) == (True, "4", "0")

    # A file arrives whole (written under a hidden name, then renamed in).
    hidden = folders["watch"] / ".photo.jpg"
    hidden.write_bytes(image_bytes((320, 240)))
    os.rename(hidden, folders["watch"] / "photo.jpg")
    wait_for(lambda: Image.objects.exists(), interval=0.05, what="the claim")
    # No more sweeps: one sent later could only find the image it is putting away.
    system.kill("beat", signal.SIGTERM)
    image = wait_for(
        lambda: Image.objects.filter(status=Image.Status.DONE, in_folder=False).first(),
        what="the image",
    )
    recorded = Sweep.objects.get()
    assert (recorded.claimed, recorded.schedule_name) == (1, "sweep-watch-folder")
    assert image.sweep_id == recorded.id
    assert ScheduleActivity.objects.get(schedule_name="sweep-watch-folder").last_found == recorded
    assert results_of(["jobs.make_thumbnails"]) == ["jobs.make_thumbnails"]
    kept = TaskResult.objects.get(task_name="jobs.sweep_folder")
    assert (kept.task_id, kept.status) == (recorded.task_id, "SUCCESS")
    assert kept.periodic_task_name == "sweep-watch-folder"
    assert results_of(["jobs.recover", "jobs.apply_retention"]) == []


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_recover_keeps_a_task_result_only_when_it_repaired_something(system, folders, broker):
    system.worker()
    idle = recover.apply_async()
    wait_for(
        lambda: f"Task jobs.recover[{idle.id}] succeeded" in system.logs(),
        what="a recovery with nothing to do",
    )
    assert not TaskResult.objects.filter(task_id=idle.id).exists()

    # An upload whose message was lost long ago: the next recovery queues it again.
    upload = folders["media"] / "uploads" / "lost" / "up.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(image_bytes((64, 48)))
    found = os.stat(upload)
    image = Image.objects.create(
        source=Image.Source.UPLOAD,
        folder=str(upload.parent),
        name="up.jpg",
        source_path=str(upload),
        file_size=found.st_size,
        mtime_ns=found.st_mtime_ns,
        device=found.st_dev,
        inode=found.st_ino,
        sizes=["32x32"],
        sizes_key="32x32",
        queued_at=timezone.now() - timedelta(hours=1),
    )
    busy = recover.apply_async()
    result = wait_for(
        lambda: TaskResult.objects.filter(task_id=busy.id).first(), what="the recovery's result"
    )
    assert (result.status, result.task_name) == ("SUCCESS", "jobs.recover")
    assert json.loads(result.result) == {"requeued": 1, "settled": 0}
    wait_for(
        lambda: Image.objects.filter(id=image.id, status=Image.Status.DONE).exists(),
        what="the upload to be processed",
    )

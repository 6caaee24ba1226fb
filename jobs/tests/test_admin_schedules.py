"""Schedules made, edited and disabled in the admin reach a running beat without a restart.

Real Redis, a real `celery worker` and a real `celery beat` with Parroter's scheduler, against
the file-backed test database; the admin is driven through its forms with the test client.
"""

from __future__ import annotations

import io
import json
import signal
import time
import zipfile

import pytest
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from PIL import Image as PILImage

from jobs.beat import SETTINGS_MARK
from jobs.broker import queue_length
from jobs.models import Image, ScheduleActivity, Sweep

from .conftest import image_bytes, jpeg_tables
from .processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def task_form(
    folders, interval: IntervalSchedule, sizes: str, enabled: bool = True, quality: str = ""
) -> dict:
    data = {
        "name": "second folder",
        "regtask": "jobs.sweep_folder",
        "task": "",
        "description": "",
        "folder": str(folders["other"]),
        "sizes": sizes,
        "quality": quality,
        "interval": interval.id,
        "args": "[]",
        "kwargs": "",
        "headers": "{}",
    }
    if enabled:
        data["enabled"] = "on"
    return data


def beat_reloads(system) -> int:
    """How often beat has read a changed schedule from the database."""
    return (system.log_dir / "beat.log").read_text().count("DatabaseScheduler: Schedule changed.")


def finished(name: str) -> Image | None:
    return Image.objects.filter(name=name, status=Image.Status.DONE, in_folder=False).first()


def sweep_every_second(name: str, folder, **fields: object) -> PeriodicTask:
    """A sweep schedule of folder as the admin makes one, due every second."""
    return PeriodicTask.objects.create(
        name=name,
        task="jobs.sweep_folder",
        interval=IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)[
            0
        ],
        kwargs=json.dumps({"folder": str(folder)}),
        **fields,
    )


def test_beat_follows_tasks_added_edited_and_disabled_in_the_admin(
    system, folders, drop, admin_client
):
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    sweep_every_second(
        "entry removed from settings",
        folders["watch"],
        description=f"{SETTINGS_MARK} when beat starts.",
    )
    system.worker()
    system.beat()
    wait_for(
        lambda: ScheduleActivity.objects.filter(schedule_name="sweep-watch-folder").exists(),
        what="beat's first sweep",
    )
    retired = PeriodicTask.objects.get(name="entry removed from settings")
    assert not retired.enabled
    assert "until its entry was removed" in retired.description
    assert PeriodicTask.objects.get(name="sweep-watch-folder").description.startswith(SETTINGS_MARK)

    # Added through the admin form, with a thumbnail quality: beat picks it up.
    add = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"),
        task_form(folders, every_second, "40x30", quality="40"),
    )
    assert add.status_code == 302, add.content.decode()[:2000]
    drop(folders["other"], "first.jpg", image_bytes((800, 200)))
    first = wait_for(lambda: finished("first.jpg"), what="the first image of the new task")
    assert first.thumbnails == {"40x30": [40, 10]}
    assert first.sweep.schedule_name == "second folder"
    assert first.sweep.options == first.options == {"quality": 40}
    with zipfile.ZipFile(folders["media"] / first.archive) as archive:
        made = PILImage.open(io.BytesIO(archive.read("first_40x10.jpg")))
        assert made.quantization == jpeg_tables(40)

    # Edited: the next sweeps use the new sizes (and the default quality).
    task = PeriodicTask.objects.get(name="second folder")
    change_url = reverse("admin:django_celery_beat_periodictask_change", args=[task.id])
    reloads = beat_reloads(system)
    edit = admin_client.post(change_url, task_form(folders, every_second, "20x20"))
    assert edit.status_code == 302, edit.content.decode()[:2000]
    # Idle sweeps leave no record: once beat has read the edit, wait for three sweeps of
    # the task, so that one sent before the edit is long done when the file arrives.
    wait_for(lambda: beat_reloads(system) > reloads, what="beat to read the edit")
    idle = ScheduleActivity.objects.get(schedule_name="second folder").idle_sweeps
    wait_for(
        lambda: ScheduleActivity.objects.get(schedule_name="second folder").idle_sweeps >= idle + 3,
        what="sweeps with the edited sizes",
    )
    drop(folders["other"], "second.jpg", image_bytes((800, 200)))
    second = wait_for(lambda: finished("second.jpg"), what="the image after the edit")
    assert second.thumbnails == {"20x20": [20, 5]}
    assert second.options == {}

    # Disabled: no more sweeps of that folder.
    disable = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_changelist"),
        {"action": "disable_tasks", "_selected_action": [task.id]},
    )
    assert disable.status_code == 302
    # Beat looks for changes at least every 5 s; a sweep already sent may still run.
    time.sleep(7)
    count = Sweep.objects.filter(schedule_name="second folder").count()
    idle = ScheduleActivity.objects.get(schedule_name="second folder").idle_sweeps
    drop(folders["other"], "third.jpg", image_bytes((800, 200)))
    time.sleep(4)
    assert Sweep.objects.filter(schedule_name="second folder").count() == count
    assert ScheduleActivity.objects.get(schedule_name="second folder").idle_sweeps == idle
    assert not Image.objects.filter(name="third.jpg").exists()


def test_watch_sends_no_sweep_while_the_watch_folder_schedule_is_switched_off(
    system, folders, drop, admin_client, tmp_path
):
    # Only the watch can take a file within the test: the interval never comes round.
    system.environment.update({"SWEEP_INTERVAL": "3600", "WATCH_EVENTS": "true"})
    system.worker()
    system.beat()
    wait_for(lambda: "watching" in system.logs(), timeout=30, what="the watch to start")
    entry = PeriodicTask.objects.get(name="sweep-watch-folder")
    switch = reverse("admin:django_celery_beat_periodictask_changelist")

    def rename_in(name: str, size: tuple[int, int]) -> None:
        # Each its own content: neither is the other's duplicate, whichever is done first.
        staged = drop(tmp_path / "staging", name, image_bytes(size))
        staged.rename(folders["watch"] / name)

    # Switched off in the admin, as a settings row may be: the watch sends nothing.
    admin_client.post(switch, {"action": "disable_tasks", "_selected_action": [entry.id]})
    wait_for(lambda: "sends no sweep while" in system.logs(), what="beat to switch the watch")
    rename_in("off.jpg", (640, 480))
    time.sleep(4)  # the watch sends within 0.5 s of a rename; a worker takes it at once
    assert not Sweep.objects.exists()
    assert not Image.objects.exists()

    # Switched on again: the next file renamed in is taken at once.
    admin_client.post(switch, {"action": "enable_tasks", "_selected_action": [entry.id]})
    wait_for(lambda: "sends sweeps again" in system.logs(), what="beat to switch the watch")
    rename_in("on.jpg", (480, 640))
    wait_for(lambda: finished("on.jpg"), what="the file renamed in once switched on")


def test_sweeps_an_admin_made_schedule_left_waiting_for_a_stopped_worker_are_dropped(
    system, folders, broker, settings
):
    sweep_every_second("second folder", folders["other"])
    system.beat()  # and no worker: every second beat queues a sweep of the folder
    wait_for(
        lambda: (system.log_dir / "beat.log").read_text().count("task second folder") >= 5,
        what="five sweeps of the second folder sent",
    )
    system.kill("beat", signal.SIGTERM)
    sent = (system.log_dir / "beat.log").read_text().count("task second folder")
    # Past the last one's expiry (at least a second: jobs.beat.Scheduler.apply_async).
    time.sleep(1.5)
    system.worker()
    wait_for(lambda: queue_length(settings.SWEEP_QUEUE) == 0, what="the sweep queue taken")
    time.sleep(1)  # the last message taken is dropped or run

    # Each was worthless once the next was due: dropped, not run one by one.
    assert sent >= 5
    assert not ScheduleActivity.objects.filter(schedule_name="second folder").exists()
    assert (
        "Discarding revoked task: jobs.sweep_folder" in (system.log_dir / "worker.log").read_text()
    )

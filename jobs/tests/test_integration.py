"""The whole chain with real parts: Redis, `celery worker` and `celery beat` processes.

The test database is a file (SQLite) or PostgreSQL, so the worker and beat subprocesses
see the same rows as the test.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult

from jobs.models import Image, Sweep

from .conftest import image_bytes
from .processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def final_images(count: int) -> list[Image]:
    images = list(Image.objects.filter(status__in=Image.FINAL_STATUSES, in_folder=False))
    return images if len(images) >= count else []


def test_beat_sweeps_the_watch_folder_and_workers_make_the_zips(system, folders, drop):
    system.worker()
    system.beat()
    photo = image_bytes((1600, 1200))
    drop(folders["watch"], "holiday/photo.jpg", photo)
    drop(folders["watch"], "logo.png", image_bytes((300, 300), "RGBA", "PNG", (0, 0, 255, 128)))
    drop(folders["watch"], "notes.jpg", b"not an image at all")
    drop(folders["watch"], ".hidden.jpg")

    wait_for(lambda: final_images(3), timeout=90, what="three images to finish")

    done = Image.objects.get(name="holiday/photo.jpg")
    assert done.status == Image.Status.DONE
    assert done.thumbnails == {"128x128": [128, 96], "256x256": [256, 192], "512x512": [512, 384]}
    with zipfile.ZipFile(folders["media"] / done.archive) as archive:
        assert archive.read("photo.jpg") == photo
        assert len(archive.namelist()) == 4
    assert Path(done.original_path).read_bytes() == photo
    assert Image.objects.get(name="logo.png").status == Image.Status.DONE
    failed = Image.objects.get(name="notes.jpg")
    assert failed.status == Image.Status.FAILED
    assert "not an image" in failed.error
    assert (folders["watch"] / ".hidden.jpg").exists()
    assert not (folders["watch"] / "holiday" / "photo.jpg").exists()

    sweep = done.sweep
    assert sweep.trigger == Sweep.Trigger.SCHEDULE
    assert sweep.schedule_name == "sweep-watch-folder"
    results = TaskResult.objects.filter(task_name="jobs.make_thumbnails", status="SUCCESS")
    assert results.count() >= 3
    assert json.loads(results.first().task_args)
    sweep_results = TaskResult.objects.filter(task_name="jobs.sweep_folder")
    assert sweep_results.filter(periodic_task_name="sweep-watch-folder").exists()


def test_beat_picks_up_a_new_periodic_task_without_restart(system, folders, drop):
    system.worker()
    system.beat()
    wait_for(
        lambda: Sweep.objects.filter(schedule_name="sweep-watch-folder").exists(),
        what="beat's first sweep",
    )
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name="other folder",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(folders["other"]), "sizes": ["40x30", "20x20"]}),
    )
    # Arguments written by hand with a typo: the sweep is recorded as failed, saying why.
    typo = folders["root"] / "typo"
    typo.mkdir()
    PeriodicTask.objects.create(
        name="typo in kwargs",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(typo), "qualty": 40}),
    )
    drop(folders["other"], "wide.jpg", image_bytes((800, 200)))

    wait_for(lambda: final_images(1), timeout=60, what="the other folder's image")
    failed = wait_for(
        lambda: Sweep.objects.filter(schedule_name="typo in kwargs").first(),
        what="the sweep with a typo",
    )
    assert failed.status == Sweep.Status.FAILED
    assert "unknown argument(s) 'qualty'" in failed.error

    image = Image.objects.get(name="wide.jpg")
    assert image.status == Image.Status.DONE
    assert image.folder == str(folders["other"])
    assert image.thumbnails == {"40x30": [40, 10], "20x20": [20, 5]}
    assert image.sweep.schedule_name == "other folder"
    with zipfile.ZipFile(folders["media"] / image.archive) as archive:
        assert sorted(archive.namelist()) == ["wide.jpg", "wide_20x5.jpg", "wide_40x10.jpg"]

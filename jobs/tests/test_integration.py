"""The whole chain with real parts: Redis, `celery worker` and `celery beat` processes.

The test database is a file (SQLite) or PostgreSQL, so the worker and beat subprocesses
see the same rows as the test.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import psutil
import pytest
from django.db import connection
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult
from PIL import Image as PILImage

from jobs.models import Image, ScheduleActivity, Sweep

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
        lambda: ScheduleActivity.objects.filter(schedule_name="sweep-watch-folder").exists(),
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


def test_workers_make_thumbnails_of_phone_photos(system, folders, drop):
    system.worker()
    system.beat()
    # An AVIF stored on its side (EXIF orientation 6) and a HEIC with transparency.
    upright = PILImage.new("RGB", (400, 200), (200, 30, 30))
    upright.paste((30, 30, 200), (200, 0, 400, 200))  # blue on the right
    exif = PILImage.Exif()
    exif[0x0112] = 6
    turned = io.BytesIO()
    upright.transpose(PILImage.Transpose.ROTATE_90).save(
        turned, "AVIF", quality=90, exif=exif.tobytes()
    )
    drop(folders["watch"], "side.avif", turned.getvalue())
    clear = io.BytesIO()
    PILImage.new("RGBA", (300, 300), (0, 200, 0, 100)).save(clear, "HEIF", quality=90)
    drop(folders["watch"], "clear.heic", clear.getvalue())

    wait_for(lambda: final_images(2), timeout=90, what="both phone photos to finish")

    side = Image.objects.get(name="side.avif")
    assert (side.status, side.format, side.width, side.height) == ("done", "AVIF", 400, 200)
    with zipfile.ZipFile(folders["media"] / side.archive) as archive:
        assert archive.namelist()[1:] == ["side_400x200.jpg", "side_256x128.jpg", "side_128x64.jpg"]
        thumb = PILImage.open(io.BytesIO(archive.read("side_128x64.jpg")))
    assert thumb.getpixel((10, 32))[0] > 150  # red on the left: turned upright, once
    assert thumb.getpixel((118, 32))[2] > 150
    clear_image = Image.objects.get(name="clear.heic")
    assert (clear_image.status, clear_image.format) == ("done", "HEIF")
    with zipfile.ZipFile(folders["media"] / clear_image.archive) as archive:
        assert archive.namelist()[1:] == [
            "clear_300x300.png",
            "clear_256x256.png",
            "clear_128x128.png",
        ]
        thumb = PILImage.open(io.BytesIO(archive.read("clear_128x128.png")))
    assert thumb.mode == "RGBA"
    assert 80 <= thumb.getpixel((64, 64))[3] <= 120


def test_a_pool_process_keeps_its_database_connection_from_task_to_task(
    system, folders, drop, tmp_path
):
    # Celery's default would open a new connection for every task (0.8 ms CPU on SQLite,
    # 6.5 ms on PostgreSQL); jobs/worker.py keeps it while it works and is under
    # CONN_MAX_AGE. Leases renewed only after 10 s: no lease thread opens one of its own.
    opened = tmp_path / "connections"
    system.environment.update(PARROTER_FAULT_CONNECTIONS=str(opened), LEASE_SECONDS="30")
    system.worker(concurrency=1, app="jobs.tests.fault_app")
    system.beat()
    for number in range(6):
        drop(folders["watch"], f"photo-{number}.jpg", image_bytes((320 + number, 240)))

    wait_for(lambda: final_images(6), timeout=90, what="six images to finish")

    assert Image.objects.filter(status=Image.Status.DONE).count() == 6
    # Six image tasks and the sweeps that claimed them ran in the one pool process.
    assert TaskResult.objects.filter(task_name="jobs.make_thumbnails").count() == 6
    pids = opened.read_text().split()
    assert len(pids) == 1, f"{len(pids)} connections opened by pool processes {set(pids)}"


def test_a_pool_process_whose_database_connection_was_cut_connects_again(system, folders, drop):
    # The connection a pool process keeps between tasks can die (a PostgreSQL restart, a
    # proxy's idle timeout): the next task notices before its first query
    # (CONN_HEALTH_CHECKS) and opens a new one, instead of failing its image.
    if connection.vendor != "postgresql":
        pytest.skip("cuts a PostgreSQL backend; SQLite has no connection to lose")
    system.worker(concurrency=1)
    system.beat()
    drop(folders["watch"], "first.jpg", image_bytes((320, 240)))
    wait_for(lambda: final_images(1), timeout=90, what="the first image to finish")

    pool_process = psutil.Process(int(Image.objects.get().worker.rpartition(":")[2]))
    ports = {kept.laddr.port for kept in pool_process.net_connections(kind="tcp")}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND client_port = ANY(%s)",
            [list(ports)],
        )
        assert cursor.fetchall() == [(True,)]

    drop(folders["watch"], "second.jpg", image_bytes((321, 240)))
    wait_for(lambda: final_images(2), timeout=90, what="the second image to finish")
    second = Image.objects.get(name="second.jpg")
    assert second.status == Image.Status.DONE, second.error
    assert second.attempts == 1
    assert second.worker == Image.objects.get(name="first.jpg").worker
    # Nor did a sweep run by that process meanwhile meet the dead connection.
    logs = system.logs()
    for error in ("OperationalError", "InterfaceError"):
        assert error not in logs, logs[-4000:]

"""Reliability under real faults: bad input, killed workers, a lost Redis, racing sweeps.

Every test runs real Redis and Celery processes (see conftest.system) and ends by checking
the same promise: every file dropped is accounted for exactly once (one final record, one
archive when done) and its original bytes are still on disk where a person can find them.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import psutil
import pytest
from django.conf import settings
from django.db import connection
from django_celery_results.models import TaskResult
from PIL import Image as PILImage

from jobs import uploads
from jobs.models import Image, ScheduleActivity, Sweep
from jobs.redis_server import start_bundled_redis
from jobs.tasks import make_thumbnails, queue_images, sweep_folder

from .conftest import image_bytes
from .processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FAULT_APP = "jobs.tests.fault_app"


def photo(index: int, size: tuple[int, int] = (900, 600)) -> bytes:
    """A distinct JPEG per index, so that no two count as duplicates."""
    return image_bytes(size, colour=(index * 7 % 256, index * 13 % 256, index * 29 % 256))


def drop_batch(folder: Path, count: int) -> dict[str, bytes]:
    batch = {f"batch/{index:03}.jpg": photo(index) for index in range(count)}
    for name, data in batch.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return batch


def all_final(count: int) -> bool:
    return Image.objects.filter(status__in=Image.FINAL_STATUSES, in_folder=False).count() >= count


def count_done() -> int:
    return Image.objects.filter(status=Image.Status.DONE).count()


def assert_each_done_once(batch: dict[str, bytes], media: Path) -> None:
    """One done record and one archive per file; original bytes kept; no temp left."""
    records = {image.name: image for image in Image.objects.all()}
    assert sorted(records) == sorted(batch), "every file has exactly one record"
    for name, data in batch.items():
        image = records[name]
        assert image.status == Image.Status.DONE, (name, image.status, image.error)
        assert Path(image.original_path).read_bytes() == data
        with zipfile.ZipFile(media / image.archive) as archive:
            assert archive.read(Path(name).name) == data
    archives = list((media / "archives").rglob("*.zip"))
    assert len(archives) == len(batch), "one archive per image, no strays"
    assert not list(media.rglob("*.part")), "no temporary file left behind"


def pool_children(worker: psutil.Process) -> list[psutil.Process]:
    return [child for child in worker.children(recursive=True) if child.is_running()]


def test_bad_input_is_recorded_with_a_reason_and_kept(system, folders, drop, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photo(1))
    huge_png = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
        + png_chunk(b"IEND", b"")
    )
    corpus = {
        "zero.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, this is text\n" * 10, "not an image"),
        "truncated.jpg": (photo(2, (1200, 900))[:3000], "truncated or corrupt"),
        "truncated.png": (image_bytes((400, 300), fmt="PNG")[:200], ""),
        "vector.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
        "bomb.png": (huge_png, "pixel"),
        "subdir/same name.jpg": (photo(3), None),
        "other/same name.jpg": (photo(4), None),
        "фото 📷 ünïcödé.jpg": (photo(5), None),
        "a?b.jpg": (photo(6), None),
        "a*b.jpg": (photo(7), None),
        ("long " * 45).strip() + ".jpg": (photo(8), None),
        "really-a-png.jpg": (image_bytes((50, 40), fmt="PNG"), None),
    }
    for name, (data, _) in corpus.items():
        drop(folders["watch"], name, data)
    (folders["watch"] / "escape.jpg").symlink_to(outside)
    system.environment["MAX_IMAGE_PIXELS"] = str(50_000_000)
    worker = psutil.Process(system.worker().pid)
    system.beat()
    wait_for(lambda: len(pool_children(worker)) == 2, what="the worker's pool")
    children = {child.pid for child in pool_children(worker)}

    wait_for(lambda: all_final(len(corpus) + 1), timeout=90, what="every file to finish")

    records = {image.name: image for image in Image.objects.all()}
    assert sorted(records) == sorted([*corpus, "escape.jpg"])
    for name, (data, reason) in corpus.items():
        image = records[name]
        kept = Path(image.original_path)
        assert kept.read_bytes() == data, name
        if reason is None:
            assert image.status == Image.Status.DONE, (name, image.error)
        else:
            assert image.status == Image.Status.FAILED, name
            assert reason in image.error, (name, image.error)
            assert kept.is_relative_to(folders["media"] / "failed")
            assert image.error in kept.with_name(kept.name + ".error.txt").read_text()
    assert records["really-a-png.jpg"].format == "PNG"
    link = records["escape.jpg"]
    assert link.status == Image.Status.FAILED
    assert "symbolic link" in link.error
    assert Path(link.original_path).is_symlink()
    assert outside.read_bytes() == photo(1)
    archive_names = {Path(image.archive).name for image in records.values() if image.archive}
    done = [name for name, (_, reason) in corpus.items() if reason is None]
    assert len(archive_names) == len(done), "names alike after sanitising get distinct archives"
    assert {child.pid for child in pool_children(worker)} == children, "no pool process died"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_killing_the_worker_mid_batch_loses_nothing(system, folders):
    system.environment["PARROTER_FAULT_DELAY"] = "0.4"
    batch = drop_batch(folders["watch"], 12)
    system.worker(app=FAULT_APP)
    system.beat()
    wait_for(lambda: count_done() >= 2, timeout=60, what="the first images")
    system.kill("worker")  # SIGKILL to the worker and its pool, mid-batch
    assert count_done() < len(batch), "the kill came too late to test anything"
    system.worker(app=FAULT_APP)
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the batch after a restart")
    assert_each_done_once(batch, folders["media"])


def test_killing_one_pool_process_loses_nothing(system, folders, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    # One run holds still just after its start (the others carry on, slowed): the kill is
    # certain to come in the middle of that run, not after it ended on a busy machine.
    system.environment.update(
        PARROTER_FAULT_DELAY="0.4",
        PARROTER_FAULT_PAUSE_AT="read",
        PARROTER_FAULT_MARKERS=str(markers),
    )
    batch = drop_batch(folders["watch"], 10)
    worker = psutil.Process(system.worker(app=FAULT_APP).pid)
    system.beat()
    paused = markers / "paused-read"
    victim = int(
        wait_for(lambda: paused.exists() and paused.read_text(), what="a run held mid-way")
    )
    # The label says which pool process runs it (one host, so its PIDs are unique here).
    busy = next(
        image
        for image in Image.objects.filter(status=Image.Status.PROCESSING)
        if image.worker.rpartition(":")[2] == str(victim)
    )
    assert victim in {child.pid for child in pool_children(worker)}
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the batch after a child died")
    assert_each_done_once(batch, folders["media"])
    retried = Image.objects.get(id=busy.id)
    assert retried.attempts == 2, "taken over once its lease ran out"
    assert retried.token != busy.token
    others = Image.objects.exclude(id=busy.id).values_list("attempts", flat=True)
    assert list(others) == [1] * (len(batch) - 1), "no live run was taken over"


def test_a_poison_file_fails_after_max_attempts_and_spares_the_rest(system, folders):
    system.environment.update(
        PARROTER_FAULT_POISON="poison", MAX_ATTEMPTS="2", PARROTER_FAULT_DELAY="0"
    )
    batch = drop_batch(folders["watch"], 6)
    poison = photo(99)
    (folders["watch"] / "poison.jpg").write_bytes(poison)
    system.worker(app=FAULT_APP)
    system.beat()
    wait_for(lambda: all_final(len(batch) + 1), timeout=120, what="the batch and the poison")
    image = Image.objects.get(name="poison.jpg")
    assert image.status == Image.Status.FAILED
    assert image.attempts == 2
    assert "2 times" in image.error
    assert Path(image.original_path).read_bytes() == poison
    assert count_done() == len(batch)


def test_a_redis_restart_mid_batch_loses_nothing(system, folders, redis_server):
    system.environment["PARROTER_FAULT_DELAY"] = "0.3"
    batch = drop_batch(folders["watch"], 12)
    system.worker(app=FAULT_APP)
    system.beat()
    wait_for(lambda: count_done() >= 2, timeout=60, what="the first images")
    redis_server.process.kill()  # no persistence: every queued message is gone
    redis_server.process.wait()
    time.sleep(1)
    with start_bundled_redis(port=redis_server.port, password=redis_server.password):
        wait_for(lambda: all_final(len(batch)), timeout=150, what="the batch after Redis")
    assert_each_done_once(batch, folders["media"])


def test_two_sweeps_at_the_same_instant_claim_each_file_once(system, folders):
    batch = drop_batch(folders["watch"], 40)
    time.sleep(0.6)  # past SETTLE_SECONDS
    sweeps = [system.manage("sweep", "--no-wait") for _ in range(2)]
    outputs = [process.communicate(timeout=60)[0].decode() for process in sweeps]
    assert [process.returncode for process in sweeps].count(0) >= 1, outputs
    assert Image.objects.count() == len(batch)
    assert sum(Sweep.objects.values_list("claimed", flat=True)) == len(batch)
    system.worker()
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the claimed batch")
    assert_each_done_once(batch, folders["media"])


def test_racing_deliveries_of_one_image_make_one_archive(system, folders, redis_server):
    batch = drop_batch(folders["watch"], 1)
    time.sleep(0.6)
    system.manage("sweep", "--no-wait").communicate(timeout=60)
    image = Image.objects.get()
    # The same message delivered six times to two workers, as a redelivery storm would.
    with make_thumbnails.app.connection_for_write(redis_server.url) as connection:
        for _ in range(6):
            make_thumbnails.apply_async((image.id,), connection=connection)
    system.worker("worker-a")
    system.worker("worker-b")
    wait_for(lambda: all_final(1), timeout=60, what="the image")

    def deliveries_run() -> int:
        return TaskResult.objects.filter(task_name="jobs.make_thumbnails", status="SUCCESS").count()

    # The sweep's own message and the six: every one run to its end, the redundant ones too.
    wait_for(lambda: deliveries_run() >= 7, timeout=60, what="every delivery to run")
    assert deliveries_run() == 7
    assert_each_done_once(batch, folders["media"])
    assert Image.objects.get().attempts == 1


def test_two_beats_by_mistake_still_process_each_file_once(system, folders):
    batch = drop_batch(folders["watch"], 15)
    system.worker()
    system.beat("beat-a")
    system.beat("beat-b")
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the batch")
    assert_each_done_once(batch, folders["media"])


def test_a_file_written_slowly_is_taken_only_when_complete(system, folders):
    # Well above the pauses below: a busy machine may hold this process up between
    # two writes, and a file unchanged for SETTLE_SECONDS counts as complete.
    system.environment["SETTLE_SECONDS"] = "3"
    buffer = io.BytesIO()
    PILImage.effect_noise((800, 800), 64).convert("RGB").save(buffer, "JPEG")
    data = buffer.getvalue()
    system.worker()
    system.beat()
    wait_for(lambda: ScheduleActivity.objects.exists(), what="beat's first sweep")
    target = folders["watch"] / "slow.jpg"
    chunks = [
        data[start : start + len(data) // 6 + 1]
        for start in range(0, len(data), len(data) // 6 + 1)
    ]
    idle = ScheduleActivity.objects.get().idle_sweeps
    with target.open("wb") as handle:
        for chunk in chunks:  # about 3.5 s of writing: several sweeps see it growing
            handle.write(chunk)
            handle.flush()
            time.sleep(0.6)
    # Sweeps ran while it was written, and left it alone (a sweep that only sees a file
    # still changing is idle).
    assert ScheduleActivity.objects.get().idle_sweeps - idle >= 2
    assert not Image.objects.exists()
    wait_for(lambda: all_final(1), timeout=60, what="the slow file")
    assert_each_done_once({"slow.jpg": data}, folders["media"])


def test_an_image_over_the_time_limit_fails_with_that_reason(system, folders):
    system.environment.update(
        PARROTER_FAULT_DELAY="2.5", IMAGE_SOFT_TIME_LIMIT="1", IMAGE_TIME_LIMIT="5"
    )
    data = photo(1)
    (folders["watch"] / "slow.jpg").write_bytes(data)
    system.worker(app=FAULT_APP)
    system.beat()
    wait_for(lambda: all_final(1), timeout=60, what="the slow image")
    image = Image.objects.get()
    assert image.status == Image.Status.FAILED
    assert "time limit" in image.error
    assert Path(image.original_path).read_bytes() == data
    assert not list(folders["media"].rglob("*.part"))


def test_a_busy_sqlite_database_delays_but_loses_nothing(system, folders):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's single writer lock is what is under test")
    batch = drop_batch(folders["watch"], 10)
    system.worker()
    system.beat()
    wait_for(lambda: count_done() >= 1, timeout=60, what="the first image")
    # Another program holds the write lock for a while, as a long admin action would.
    with sqlite3.connect(connection.settings_dict["NAME"], timeout=30) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        time.sleep(4)
        blocker.rollback()
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the batch")
    assert_each_done_once(batch, folders["media"])


@pytest.mark.parametrize("stage", ["archive", "done"])
def test_a_crash_between_the_steps_of_an_image_is_repaired(system, folders, tmp_path, stage):
    markers = tmp_path / "markers"
    markers.mkdir()
    system.environment.update(
        PARROTER_FAULT_DIE_AFTER=stage, PARROTER_FAULT_MARKERS=str(markers), REQUEUE_AFTER="3"
    )
    batch = drop_batch(folders["watch"], 4)
    system.worker(app=FAULT_APP)
    system.beat()
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the batch after the crashes")
    assert len(list(markers.iterdir())) == len(batch), "every image crashed once"
    assert_each_done_once(batch, folders["media"])


def sweep_inline_without_privileges(system) -> subprocess.CompletedProcess[str]:
    """`manage.py sweep --inline` as a normal user would run it: file permissions bind."""
    command = [sys.executable, "manage.py", "sweep", "--inline"]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root, file permissions bind only without CAP_DAC_OVERRIDE (setpriv)")
        # Root reads and moves anything: drop the capabilities that let it.
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(
        command,
        cwd=settings.BASE_DIR,
        env=system.environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_read_only_folder_keeps_its_originals_and_each_image_its_outcome(system, folders):
    shelf = folders["watch"] / "shelf"
    shelf.mkdir()
    good, bad = photo(5), b"not a picture, whatever the name says\n" * 20
    (shelf / "good.jpg").write_bytes(good)
    (shelf / "bad.jpg").write_bytes(bad)
    shelf.chmod(0o555)  # readable, but nothing may be moved out of it
    time.sleep(0.6)
    try:
        result = sweep_inline_without_privileges(system)
    finally:
        shelf.chmod(0o755)
    assert result.returncode == 0, result.stdout + result.stderr
    done, failed = Image.objects.get(name="shelf/good.jpg"), Image.objects.get(name="shelf/bad.jpg")
    # Each ended as its content says, with no internal error; the originals stayed.
    assert done.status == Image.Status.DONE
    assert failed.status == Image.Status.FAILED
    assert "not an image" in failed.error
    assert done.in_folder
    assert failed.in_folder
    assert "original stays in the folder until it can be moved" in result.stderr
    # Once the folder lets go, the next sweep puts both away.
    system.worker()
    with make_thumbnails.app.connection_for_write(system.environment["BROKER_URL"]) as broker:
        sweep_folder.apply_async(kwargs={"folder": str(folders["watch"])}, connection=broker)
    wait_for(
        lambda: not Image.objects.filter(in_folder=True).exists(), what="the originals to move"
    )
    assert Path(Image.objects.get(id=done.id).original_path).read_bytes() == good
    assert Path(Image.objects.get(id=failed.id).original_path).read_bytes() == bad


def test_an_unreadable_file_fails_with_permission_denied_and_is_kept(system, folders):
    secret = photo(3)
    unreadable = folders["watch"] / "locked.jpg"
    unreadable.write_bytes(secret)
    unreadable.chmod(0)
    readable = photo(4)
    (folders["watch"] / "open.jpg").write_bytes(readable)
    time.sleep(0.6)
    result = sweep_inline_without_privileges(system)
    assert result.returncode == 0, result.stdout + result.stderr
    locked = Image.objects.get(name="locked.jpg")
    assert locked.status == Image.Status.FAILED
    assert "permission denied" in locked.error
    kept = Path(locked.original_path)
    assert kept.is_relative_to(folders["media"] / "failed")
    kept.chmod(0o600)
    assert kept.read_bytes() == secret
    assert Image.objects.get(name="open.jpg").status == Image.Status.DONE


def test_database_connections_killed_mid_batch_lose_nothing(system, folders):
    if connection.vendor != "postgresql":
        pytest.skip("pg_terminate_backend drops the connections under test")
    system.environment["PARROTER_FAULT_DELAY"] = "0.3"
    batch = drop_batch(folders["watch"], 12)
    worker = system.worker(app=FAULT_APP)
    beat = system.beat()
    wait_for(lambda: count_done() >= 2, timeout=60, what="the first images")
    # Every other session of the database dropped, again and again: a failover, a restart,
    # an administrator's hand.
    for _ in range(6):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        time.sleep(0.8)
    wait_for(lambda: all_final(len(batch)), timeout=150, what="the batch")
    assert_each_done_once(batch, folders["media"])
    assert worker.poll() is None, "the worker carried on"
    assert beat.poll() is None, "beat carried on"


def test_a_crash_while_reprocessing_leaves_one_archive_per_image(system, folders, tmp_path, broker):
    batch = drop_batch(folders["watch"], 3)
    system.worker()
    system.beat()
    wait_for(lambda: all_final(len(batch)), timeout=120, what="the first pass")
    system.kill("worker")
    first = dict(Image.objects.values_list("id", "archive"))
    markers = tmp_path / "markers"
    markers.mkdir()
    # Each reprocessing run dies once, its new zip renamed into place, the database not told.
    system.environment.update(
        PARROTER_FAULT_DIE_AFTER="archive", PARROTER_FAULT_MARKERS=str(markers)
    )
    system.worker(app=FAULT_APP)
    queue_images(uploads.claim_again(Image.objects.all(), ["32x32"]).queued)

    def reprocessed() -> bool:
        done = dict(Image.objects.filter(status=Image.Status.DONE).values_list("id", "archive"))
        return len(done) == len(batch) and all(done[key] != first[key] for key in first)

    wait_for(reprocessed, timeout=120, what="the batch reprocessed after the crashes")
    assert len(list(markers.iterdir())) == len(batch), "every reprocessing run crashed once"
    assert_each_done_once(batch, folders["media"])

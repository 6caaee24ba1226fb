"""One image from claim to archive, through the task body, on real files."""

from __future__ import annotations

import io
import os
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError, connection
from django.db.models import F
from django.db.models.functions import Now
from PIL import Image as PILImage

from jobs import leases, runner, storage, sweeper, uploads
from jobs.models import Image, Sweep
from jobs.sweeper import SweepArgumentsError
from jobs.tasks import make_thumbnails, sweep_folder

from .conftest import disk_of_its_own, image_bytes, jpeg_tables, noise_jpeg
from .processes import wait_for

pytestmark = pytest.mark.django_db


def claim(folders, drop, name: str = "photo.jpg", data: bytes | None = None) -> Image:
    drop(folders["watch"], name, data)
    sweeper.sweep_folder(str(folders["watch"]), ["64x64", "32x32"])
    return Image.objects.get(name=name)


def test_make_thumbnails_writes_the_zip_then_moves_the_original(folders, drop):
    data = image_bytes((640, 480))
    image = claim(folders, drop, data=data)
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert image.status == Image.Status.DONE
    assert (image.width, image.height, image.format) == (640, 480, "JPEG")
    assert image.thumbnails == {"64x64": [64, 48], "32x32": [32, 24]}
    assert image.attempts == 1
    assert image.started_at <= image.finished_at
    archive = folders["media"] / image.archive
    assert image.archive_size == archive.stat().st_size
    with zipfile.ZipFile(archive) as bundle:
        assert sorted(bundle.namelist()) == ["photo.jpg", "photo_32x24.jpg", "photo_64x48.jpg"]
        assert bundle.read("photo.jpg") == data
    assert not Path(image.source_path).exists()
    assert Path(image.original_path).read_bytes() == data
    assert Path(image.original_path).is_relative_to(folders["media"] / "originals")
    assert not image.in_folder
    assert image.sha256


def test_make_thumbnails_twice_makes_one_archive(folders, drop):
    image = claim(folders, drop)
    assert make_thumbnails(image.id) == Image.Status.DONE
    assert make_thumbnails(image.id) == "skipped"
    image.refresh_from_db()
    assert image.attempts == 1
    assert len(list((folders["media"] / "archives").rglob("*.zip"))) == 1


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"just some text, not a picture\n" * 20, "not an image"),
        ("cut.jpg", image_bytes((800, 600))[:2000], "truncated or corrupt"),
    ],
)
def test_make_thumbnails_fails_bad_input_and_keeps_the_original(folders, drop, name, data, reason):
    image = claim(folders, drop, name=name, data=data)
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert reason in image.error
    kept = Path(image.original_path)
    assert kept.is_relative_to(folders["media"] / "failed")
    assert kept.read_bytes() == data
    assert reason in kept.with_name(kept.name + ".error.txt").read_text()
    assert not [path for path in (folders["media"] / "archives").rglob("*") if path.is_file()]


def test_make_thumbnails_refuses_a_hard_link_and_reads_nothing_through_it(folders, tmp_path):
    # A hard link is a plain file entry: O_NOFOLLOW does not see it, its other name may be
    # anywhere on the file system.
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(image_bytes((300, 200)))
    os.link(secret, folders["watch"] / "innocent.jpg")
    sweeper.sweep_folder(str(folders["watch"]), ["64x64"])
    image = Image.objects.get(name="innocent.jpg")
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert image.error.startswith("hard link: this file has 2 names"), image.error
    assert not image.archive
    assert not image.sha256
    assert not list((folders["media"] / "archives").rglob("*.zip"))
    # Put away with the other failures, as a name only: the file outside keeps its bytes.
    assert Path(image.original_path).is_relative_to(folders["media"] / "failed")
    assert secret.read_bytes() == image_bytes((300, 200))


def test_a_file_saved_over_the_original_just_before_it_moves_stays_in_the_folder(
    folders, drop, monkeypatch
):
    image = claim(folders, drop, data=image_bytes((300, 200)))
    newer = image_bytes((320, 200), colour=(0, 0, 255))
    path = Path(image.source_path)
    looked = storage.Folder.find

    def look_then_replace(folder, name):
        # The person saves a new version right after the original was found unchanged.
        status = looked(folder, name)
        if folder.path == folders["watch"] and name == path.name and path.read_bytes() != newer:
            (folders["watch"] / "new.tmp").write_bytes(newer)
            os.replace(folders["watch"] / "new.tmp", path)
        return status

    monkeypatch.setattr(storage.Folder, "find", look_then_replace)
    assert make_thumbnails(image.id) == Image.Status.DONE
    monkeypatch.undo()
    image.refresh_from_db()
    # The new version is back where it was saved, for the next sweep; nothing in its place.
    assert path.read_bytes() == newer
    assert image.original_path == ""
    assert "is not the file that was claimed" in image.error
    assert not list((folders["media"] / "originals").rglob("*.jpg"))
    with zipfile.ZipFile(folders["media"] / image.archive) as bundle:
        assert bundle.read("photo.jpg") == image_bytes((300, 200))
    sweeper.sweep_folder(str(folders["watch"]), ["64x64"])
    again = Image.objects.exclude(id=image.id).get()
    assert make_thumbnails(again.id) == Image.Status.DONE
    again.refresh_from_db()
    assert Path(again.original_path).read_bytes() == newer


def test_make_thumbnails_of_a_long_name_in_any_script(folders, drop):
    # 100 letters of two bytes each (the 200-byte stem limit), an id of four digits, and a
    # reprocessing date: the temporary zip's name must still fit in 255 bytes.
    name = "é" * 100 + ".jpg"
    image = claim(folders, drop, name=name, data=image_bytes((80, 60)))
    # An id of four digits, as any installation soon has.
    Image.objects.filter(id=image.id).update(id=1000 + image.id)
    image = Image.objects.get(name=name)
    assert make_thumbnails(image.id) == Image.Status.DONE, Image.objects.get(id=image.id).error
    assert uploads.claim_again([Image.objects.get(id=image.id)]).queued == [image.id]
    assert make_thumbnails(image.id) == Image.Status.DONE, Image.objects.get(id=image.id).error
    image.refresh_from_db()
    assert len(Path(image.archive).name.encode()) > 200
    with zipfile.ZipFile(folders["media"] / image.archive) as bundle:
        assert bundle.namelist()[0] == name.replace(".jpg", "") + ".jpg"


def test_make_thumbnails_marks_same_content_as_duplicate(folders, drop):
    data = image_bytes((300, 200))
    first = claim(folders, drop, name="one.jpg", data=data)
    second = claim(folders, drop, name="again/two.jpg", data=data)
    assert make_thumbnails(first.id) == Image.Status.DONE
    assert make_thumbnails(second.id) == Image.Status.DUPLICATE
    second.refresh_from_db()
    assert second.duplicate_of_id == first.id
    assert not second.archive
    assert Path(second.original_path).read_bytes() == data
    assert len(list((folders["media"] / "archives").rglob("*.zip"))) == 1


def test_the_default_sizes_and_the_same_sizes_named_find_the_same_duplicates(
    folders, drop, settings
):
    # `manage.py sweep` or the upload page without sizes, then the watch folder's schedule,
    # which names THUMBNAIL_SIZES: the same sizes, so the second is a duplicate.
    settings.THUMBNAIL_SIZES = ["32x32", "64x64"]
    data = image_bytes((300, 200))
    drop(folders["watch"], "one.jpg", data)
    (first,) = sweeper.sweep_folder(str(folders["watch"]), None).to_queue
    drop(folders["watch"], "two.jpg", data)
    (second,) = sweeper.sweep_folder(str(folders["watch"]), ["32x32", "64x64"]).to_queue
    assert make_thumbnails(first) == Image.Status.DONE
    assert make_thumbnails(second) == Image.Status.DUPLICATE
    assert Image.objects.get(id=first).sizes == ["64x64", "32x32"]  # largest first, as named


def test_a_file_claimed_through_another_hosts_mount_of_the_share_is_the_same_file(folders, drop):
    # On NFS and SMB each client numbers its mount of a share (st_dev) itself, and a host
    # numbers it anew after a remount: the host that claimed a file saw another device.
    drop(folders["watch"], "shared.jpg")
    (image_id,) = sweeper.sweep_folder(str(folders["watch"]), None).to_queue
    Image.objects.filter(id=image_id).update(device=F("device") + 1)
    assert make_thumbnails(image_id) == Image.Status.DONE, Image.objects.get(id=image_id).error
    assert sweeper.sweep_folder(str(folders["watch"]), None).to_queue == []
    assert Image.objects.count() == 1


def test_make_thumbnails_does_not_follow_symlinks(folders, drop, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes())
    (folders["watch"] / "link.jpg").symlink_to(secret)
    sweeper.sweep_folder(str(folders["watch"]), None)
    image = Image.objects.get(name="link.jpg")
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert "symbolic link" in image.error
    assert Path(image.original_path).is_symlink()
    assert secret.exists()


def test_make_thumbnails_records_a_file_that_vanished(folders, drop):
    image = claim(folders, drop)
    os.unlink(image.source_path)
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert "vanished" in image.error
    assert image.original_path == ""
    assert not image.in_folder


def test_read_original_refuses_paths_outside_the_configured_folders(folders, tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(image_bytes())
    with pytest.raises(storage.NotBeneath, match="outside the configured"):
        storage.read_original(outside, None, max_bytes=10**9)
    with pytest.raises(storage.NotBeneath, match="outside the configured"):
        storage.read_original(folders["watch"] / ".." / ".." / "elsewhere.jpg", None, 10**9)


@pytest.fixture
def tiny_archive_disk(folders):
    """A real 64 KiB file system mounted where archives go (needs root)."""
    with disk_of_its_own(folders, "archives", "64k") as path:
        yield path


def test_make_thumbnails_reports_a_full_disk_and_keeps_the_original(
    folders, drop, tiny_archive_disk, settings
):
    settings.MIN_FREE_MB = 0  # or the sweep would hold back, claiming nothing on this disk
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(buffer, "PNG")
    data = buffer.getvalue()  # noise: about 270 KB, more than the disk holds
    image = claim(folders, drop, name="big.png", data=data)
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert "disk full" in image.error
    assert Path(image.original_path).read_bytes() == data
    assert not [path for path in tiny_archive_disk.rglob("*") if path.is_file()]


def test_sweep_folder_task_fails_loudly_on_bad_kwargs(folders):
    with pytest.raises(ValueError, match="outside the allowed WATCH_ROOTS"):
        sweep_folder(folder="/etc", sizes=["64x64"])
    recorded = Sweep.objects.get()
    assert recorded.status == Sweep.Status.FAILED
    assert "outside the allowed WATCH_ROOTS" in recorded.error


def thumbnail(image: Image, media: Path, label: str) -> bytes:
    with zipfile.ZipFile(media / image.archive) as bundle:
        width, height = image.thumbnails[label]
        return bundle.read(f"{Path(image.name).stem}_{width}x{height}.jpg")


def test_sweep_folder_quality_makes_smaller_or_larger_thumbnails(folders, drop):
    data = noise_jpeg()
    made = {}
    for quality in (30, 95):
        drop(folders["watch"], f"q{quality}.jpg", data)
        result = sweep_folder(folder=str(folders["watch"]), sizes=["256x256"], quality=quality)
        assert Sweep.objects.get(id=result["sweep"]).options == {"quality": quality}
        image = Image.objects.get(name=f"q{quality}.jpg")
        assert image.options == {"quality": quality}
        # Same content, other quality: a zip of its own, not a duplicate of the first.
        assert make_thumbnails(image.id) == Image.Status.DONE
        image.refresh_from_db()
        made[quality] = thumbnail(image, folders["media"], "256x256")
        assert PILImage.open(io.BytesIO(made[quality])).quantization == jpeg_tables(quality)
    assert len(made[30]) < len(made[95])


def test_sweep_folder_without_quality_uses_the_setting(folders, drop, settings):
    settings.JPEG_QUALITY = 50
    drop(folders["watch"], "photo.jpg", noise_jpeg())
    sweep_folder(folder=str(folders["watch"]), sizes=["64x64"])
    image = Image.objects.get()
    assert image.options == {}
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    made = thumbnail(image, folders["media"], "64x64")
    assert PILImage.open(io.BytesIO(made)).quantization == jpeg_tables(50)


@pytest.mark.parametrize("quality", [0, 200, "x", 50.5, True])
def test_sweep_folder_fails_on_a_bad_quality_with_a_recorded_reason(folders, drop, quality):
    drop(folders["watch"], "photo.jpg")
    with pytest.raises(SweepArgumentsError, match="quality must be a whole number from 1 to 95"):
        sweep_folder(folder=str(folders["watch"]), sizes=["64x64"], quality=quality)
    recorded = Sweep.objects.get()
    assert recorded.status == Sweep.Status.FAILED
    assert recorded.error == (
        f"bad sweep arguments: quality must be a whole number from 1 to 95, got {quality!r}"
    )
    assert not Image.objects.exists()


def test_sweep_folder_fails_on_an_unknown_argument_with_a_recorded_reason(folders, drop):
    drop(folders["watch"], "photo.jpg")
    kwargs = {"folder": str(folders["watch"]), "sizes": ["64x64"], "qualty": 40}
    with pytest.raises(SweepArgumentsError, match="unknown argument"):
        sweep_folder(**kwargs)
    recorded = Sweep.objects.get()
    assert recorded.status == Sweep.Status.FAILED
    assert recorded.error == (
        "bad sweep arguments: unknown argument(s) 'qualty'; "
        "a sweep takes only folder, sizes, quality, format, fit, gravity, metadata, colour, gps"
    )
    assert not Image.objects.exists()


def test_claim_again_keeps_the_image_options(folders, drop):
    drop(folders["watch"], "photo.jpg", noise_jpeg())
    sweep_folder(folder=str(folders["watch"]), sizes=["64x64"], quality=30)
    image = Image.objects.get()
    make_thumbnails(image.id)
    image.refresh_from_db()
    assert uploads.claim_again([image], ["20x20"]).queued == [image.id]
    image.refresh_from_db()
    assert image.options == {"quality": 30}
    assert image.sizes_key == "20x20;quality=30"
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    made = thumbnail(image, folders["media"], "20x20")
    assert PILImage.open(io.BytesIO(made)).quantization == jpeg_tables(30)


def test_make_thumbnails_leaves_a_file_that_changed_after_its_claim(folders, drop):
    image = claim(folders, drop)
    drop(folders["watch"], "photo.jpg", image_bytes((50, 50)))  # rewritten in place
    assert make_thumbnails(image.id) == Image.Status.FAILED
    image.refresh_from_db()
    assert "changed after it was claimed" in image.error
    assert not image.in_folder
    assert (folders["watch"] / "photo.jpg").exists()
    assert not list((folders["media"] / "archives").rglob("*.zip"))


def test_reprocessing_keeps_the_old_archive_until_the_new_one_is_recorded(
    folders, drop, django_capture_on_commit_callbacks
):
    image = claim(folders, drop)
    make_thumbnails(image.id)
    image.refresh_from_db()
    old = folders["media"] / image.archive
    assert uploads.claim_again([image], ["20x20"]).queued == [image.id]
    image.refresh_from_db()
    assert image.status == Image.Status.PENDING
    assert old.is_file()
    assert folders["media"] / image.archive == old, "still recorded while the new run waits"
    with django_capture_on_commit_callbacks(execute=True):
        assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    new = folders["media"] / image.archive
    assert new != old
    assert not old.exists()
    with zipfile.ZipFile(new) as bundle:
        assert sorted(bundle.namelist()) == ["photo.jpg", "photo_20x15.jpg"]
    assert image.thumbnails == {"20x20": [20, 15]}
    assert Path(image.original_path).is_file()


def database_sessions() -> int | None:
    """Open sessions on the test database (PostgreSQL only; SQLite has no server to ask)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from pg_stat_activity where datname = current_database()")
        return cursor.fetchone()[0]


def lease_expired(image_id: int) -> bool:
    return Image.objects.lease_expired().filter(id=image_id).exists()


@pytest.mark.django_db(transaction=True)
def test_keep_lease_renews_from_the_keeper_and_stops_with_the_run(folders, drop, settings):
    settings.LEASE_SECONDS = 1
    image = claim(folders, drop)
    token = Image.objects.start(image.id)
    sessions = database_sessions()
    with runner.keep_lease(image.id, token):
        Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=5))
        wait_for(lambda: not lease_expired(image.id), timeout=30, what="a renewal")
        assert leases.held() == [f"image {image.id}"]
    assert leases.held() == [], "renewing stops with the run"
    # A server process leaves pg_stat_activity a moment after its client said goodbye.
    wait_for(
        lambda: database_sessions() == sessions,
        timeout=10,
        what="the renewer to close its own connection",
    )
    Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=5))
    time.sleep(1)  # three renewal periods: a renewer still running would have renewed
    assert lease_expired(image.id)


@pytest.mark.django_db(transaction=True)
def test_keep_lease_stops_renewing_once_the_run_was_taken_over(folders, drop, settings):
    settings.LEASE_SECONDS = 1
    image = claim(folders, drop)
    token = Image.objects.start(image.id)
    with runner.keep_lease(image.id, token):
        Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=5))
        dead = Image.objects.get(id=image.id)
        assert dead.retry(settings.MAX_ATTEMPTS) == Image.Status.PENDING
        wait_for(lambda: not leases.held(), timeout=30, what="the keeper to give up")
    stored = Image.objects.get(id=image.id)
    assert (stored.status, stored.lease_until) == (Image.Status.PENDING, None)


@pytest.mark.django_db(transaction=True)
def test_process_image_outliving_its_lease_is_not_taken_over(folders, drop, settings, monkeypatch):
    settings.LEASE_SECONDS = 2
    image = claim(folders, drop)
    real_write_archive = runner.pipeline.write_archive
    retried = []

    def slow_write_archive(*args, **kwargs):
        # Past the first lease by the database's clock, with a sweep looking for dead runs.
        wait_for(
            lambda: Image.objects.filter(
                id=image.id, started_at__lt=Now() - timedelta(seconds=3)
            ).exists(),
            timeout=30,
            what="the first lease to pass",
        )
        retried.extend(sweeper.reconcile(folders["watch"]).requeue)
        return real_write_archive(*args, **kwargs)

    monkeypatch.setattr(runner.pipeline, "write_archive", slow_write_archive)
    assert runner.process_image(image.id) == Image.Status.DONE
    assert retried == []
    image.refresh_from_db()
    assert image.attempts == 1


def test_process_image_taken_over_records_nothing_and_spares_the_new_run(
    folders, drop, monkeypatch
):
    image = claim(folders, drop)
    real_write_archive = runner.pipeline.write_archive
    later: dict[str, object] = {}

    def taken_over_while_writing(*args, **kwargs):
        # This run froze; its lease ran out; a sweep retried the image; a new run started.
        Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=1))
        assert sweeper.reconcile(folders["watch"]).requeue == [image.id]
        later["token"] = Image.objects.start(image.id)
        new_run = Image.objects.get(id=image.id)
        destination = storage.archive_path(new_run)
        partial = destination.parent / f".{destination.name}.{later['token'].hex}.abc123.part"
        partial.write_bytes(b"the new run's half zip")
        later["partial"] = partial
        return real_write_archive(*args, **kwargs)

    monkeypatch.setattr(runner.pipeline, "write_archive", taken_over_while_writing)
    assert runner.process_image(image.id) == "skipped"
    stored = Image.objects.get(id=image.id)
    assert stored.status == Image.Status.PROCESSING
    assert stored.token == later["token"]
    assert stored.archive == ""
    assert later["partial"].exists(), "the new run's partial zip is left alone"
    assert (folders["watch"] / "photo.jpg").exists(), "the original waits for the new run"


def test_process_image_leaves_the_image_to_its_lease_when_the_database_drops(
    folders, drop, monkeypatch
):
    image = claim(folders, drop)
    real_mark_done = Image.mark_done

    def connection_lost(self, **result):
        raise OperationalError("terminating connection due to administrator command")

    monkeypatch.setattr(Image, "mark_done", connection_lost)
    with pytest.raises(OperationalError):
        runner.process_image(image.id)
    stored = Image.objects.get(id=image.id)
    assert (stored.status, stored.error) == (Image.Status.PROCESSING, ""), "no fault of the file"
    assert (folders["watch"] / "photo.jpg").exists()
    monkeypatch.setattr(Image, "mark_done", real_mark_done)
    Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=1))
    assert sweeper.reconcile(folders["watch"]).requeue == [image.id]
    assert runner.process_image(image.id) == Image.Status.DONE
    assert len(list((folders["media"] / "archives").rglob("*.zip"))) == 1

"""Retention: old originals and archives deleted in bounded batches, files before rows;
sweeps held back on a nearly full disk; Celery's own cleanup of old task results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from celery import current_app
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs import retention, storage, sweeper
from jobs.models import Image, ScheduleActivity, Sweep, WebhookDelivery

from .conftest import disk_of_its_own, image_bytes
from .processes import BASE_DIR, database_url

pytestmark = pytest.mark.django_db

DAY = "2020/01/01"


def finished(
    media: Path,
    name: str,
    *,
    days_old: float,
    status: str = Image.Status.DONE,
    original: bool = True,
    archive: bool = True,
    **fields: object,
) -> Image:
    """A finished image with its kept original and its zip on disk, finished days ago."""
    kept = ""
    if original:
        area = storage.FAILED if status == Image.Status.FAILED else storage.ORIGINALS
        path = media / area / DAY / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"original")
        if status == Image.Status.FAILED:
            path.with_name(path.name + storage.NOTE_SUFFIX).write_text("why it failed")
        kept = str(path)
    relative = ""
    if archive and status == Image.Status.DONE:
        relative = f"{storage.ARCHIVES}/{DAY}/{name}.zip"
        (media / relative).parent.mkdir(parents=True, exist_ok=True)
        (media / relative).write_bytes(b"zip")
    values = {
        "folder": "/inbox",
        "name": f"{name}.jpg",
        "source_path": f"/inbox/{name}.jpg",
        "original_path": kept,
        "in_folder": False,
        "file_size": 8,
        "mtime_ns": 1,
        "sizes": ["64x64"],
        "sizes_key": "64x64",
        "sha256": name.ljust(64, "0"),
        "status": status,
        "archive": relative,
        "archive_size": 3 if relative else None,
        "finished_at": timezone.now() - timedelta(days=days_old),
        **fields,
    }
    return Image.objects.create(**values)


def fresh(image: Image) -> Image:
    return Image.objects.get(id=image.id)


@pytest.fixture
def keep(settings):
    """Set the retention in days: keep(originals=…, archives=…)."""

    def set_days(originals: int = 0, archives: int = 0) -> None:
        settings.KEEP_ORIGINALS_DAYS = originals
        settings.KEEP_ARCHIVES_DAYS = archives

    return set_days


def test_apply_retention_deletes_old_originals_and_keeps_the_records(folders, keep):
    keep(originals=10)
    media = folders["media"]
    old = finished(media, "old", days_old=20)
    failed = finished(media, "bad", days_old=20, status=Image.Status.FAILED)
    recent = finished(media, "new", days_old=5)
    old_path, failed_path = Path(old.original_path), Path(failed.original_path)

    report = retention.apply_retention()

    assert (report.originals, report.archives, report.not_deleted) == (2, 0, 0)
    assert not old_path.exists()
    assert not failed_path.exists()
    assert not failed_path.with_name(failed_path.name + storage.NOTE_SUFFIX).exists()
    assert fresh(old).original_path == fresh(failed).original_path == ""
    assert fresh(old).status == Image.Status.DONE
    assert (media / fresh(old).archive).is_file(), "archives are kept forever"
    assert Path(fresh(recent).original_path).is_file()


def test_reprocess_of_an_image_whose_original_retention_deleted_says_so(
    folders, keep, admin_client
):
    keep(originals=10)
    old = finished(folders["media"], "old", days_old=20)
    retention.apply_retention()
    response = admin_client.post(
        reverse("admin:jobs_image_reprocess"), {"ids": str(old.id), "sizes": "10x10"}, follow=True
    )
    page = response.content.decode()
    assert "its original is no longer kept" in page
    assert "next sweep" not in page  # no sweep brings it back
    assert fresh(old).sizes == ["64x64"]


def test_apply_retention_deletes_old_archives_and_says_so_on_the_record(folders, keep):
    keep(archives=10)
    media = folders["media"]
    old = finished(media, "old", days_old=20)
    reprocessed = finished(media, "again", days_old=20, error="an earlier note")
    recent = finished(media, "new", days_old=5)

    report = retention.apply_retention()

    assert (report.archives, report.originals) == (2, 0)
    assert not (media / old.archive).exists()
    stored = fresh(old)
    assert (stored.archive, stored.archive_size, stored.status) == ("", None, Image.Status.DONE)
    assert re.fullmatch(
        r"archive deleted on \d{4}-\d\d-\d\d: older than KEEP_ARCHIVES_DAYS \(10 days\)",
        stored.error,
    )
    assert fresh(reprocessed).error.startswith("an earlier note; archive deleted on ")
    assert Path(stored.original_path).is_file(), "originals are kept forever"
    assert (media / fresh(recent).archive).is_file()


def test_apply_retention_keeps_an_archive_a_duplicate_within_retention_uses(folders, keep):
    keep(archives=10)
    media = folders["media"]
    used = finished(media, "used", days_old=20)
    finished(media, "copy", days_old=2, status=Image.Status.DUPLICATE, duplicate_of=used)
    gone = finished(media, "gone", days_old=30)
    finished(media, "oldcopy", days_old=20, status=Image.Status.DUPLICATE, duplicate_of=gone)

    report = retention.apply_retention()

    assert (report.archives, report.kept_for_duplicates) == (1, 1)
    assert (media / used.archive).is_file()
    assert fresh(used).archive == used.archive
    assert not (media / gone.archive).exists()
    assert fresh(gone).archive == ""


def test_apply_retention_deletes_each_file_before_its_row_forgets_it(folders, keep, monkeypatch):
    keep(originals=10, archives=10)
    images = [finished(folders["media"], f"img{number}", days_old=20) for number in range(5)]
    seen = []

    def still_recorded(field, real):
        def remove(targets):
            targets = list(targets)
            # Each row still points to its file while the file is deleted.
            for target in targets:
                assert Image.objects.filter(**{field: str(target)}).exists()
            seen.append((field, len(targets)))
            return real(targets)

        return remove

    real_originals, real_archives = storage.remove_kept_originals, storage.remove_archives
    monkeypatch.setattr(
        storage, "remove_kept_originals", still_recorded("original_path", real_originals)
    )
    monkeypatch.setattr(storage, "remove_archives", still_recorded("archive", real_archives))
    report = retention.apply_retention()
    assert (report.originals, report.archives) == (5, 5)
    assert seen == [("original_path", 5), ("archive", 5)]
    for image in images:
        stored = fresh(image)
        assert (stored.original_path, stored.archive) == ("", "")
        assert not Path(image.original_path).exists()
        assert not (folders["media"] / image.archive).exists()


def test_apply_retention_after_a_crash_between_files_and_rows_clears_the_rows(
    folders, keep, monkeypatch
):
    keep(originals=10)
    images = [finished(folders["media"], f"img{number}", days_old=20) for number in range(5)]
    real = storage.remove_kept_originals

    def crash_after_two(paths):
        real(list(paths)[:2])
        raise RuntimeError("the process died here")

    monkeypatch.setattr(storage, "remove_kept_originals", crash_after_two)
    with pytest.raises(RuntimeError):
        retention.apply_retention()
    # Two files are gone, and every row still points to its file, gone or not.
    assert [Path(image.original_path).exists() for image in images] == [False] * 2 + [True] * 3
    assert all(fresh(image).original_path == image.original_path for image in images)

    monkeypatch.setattr(storage, "remove_kept_originals", real)
    assert retention.apply_retention().originals == 5
    assert all(fresh(image).original_path == "" for image in images)
    assert not any(Path(image.original_path).exists() for image in images)


def test_apply_retention_walks_the_images_in_batches(folders, keep, caplog):
    keep(originals=10)
    for number in range(7):
        finished(folders["media"], f"img{number}", days_old=20)
    finished(folders["media"], "recent", days_old=1)
    caplog.set_level("INFO", logger="jobs.retention")
    report = retention.apply_retention(batch=3)
    assert (report.originals, report.batches) == (7, 3)
    found = re.findall(r"batch of (\d+) image\(s\), ids \d+ to \d+: (\d+) original", caplog.text)
    assert [(int(size), int(deleted)) for size, deleted in found] == [(3, 3), (3, 3), (2, 1)]


def test_apply_retention_dry_run_counts_and_deletes_nothing(folders, keep):
    keep(originals=10, archives=10)
    media = folders["media"]
    used = finished(media, "used", days_old=20)
    finished(media, "copy", days_old=1, status=Image.Status.DUPLICATE, duplicate_of=used)
    old = finished(media, "old", days_old=20)
    report = retention.apply_retention(dry_run=True)
    assert (report.originals, report.archives, report.kept_for_duplicates) == (2, 1, 1)
    assert Path(old.original_path).is_file()
    assert (media / old.archive).is_file()
    assert fresh(old).archive == old.archive


def test_retention_command_reports_what_it_deleted(folders, keep, capsys):
    keep(archives=10)
    old = finished(folders["media"], "old", days_old=20)
    call_command("retention", "--dry-run")
    assert "would delete 0 original(s), 1 archive(s)" in capsys.readouterr().out
    call_command("retention")
    out = capsys.readouterr().out
    assert "originals kept forever, archives kept 10 days" in out
    assert "deleted 0 original(s), 1 archive(s)" in out
    assert fresh(old).archive == ""


def test_content_whose_archive_was_deleted_gets_a_new_archive(
    folders, drop, keep, sweep_and_process
):
    keep(archives=10)
    picture = image_bytes((120, 90))
    drop(folders["watch"], "first.jpg", picture)
    first = sweep_and_process()[0]
    Image.objects.filter(id=first.id).update(finished_at=timezone.now() - timedelta(days=20))
    assert retention.apply_retention().archives == 1
    drop(folders["watch"], "again.jpg", picture)
    again = sweep_and_process()[0]
    assert again.status == Image.Status.DONE, "not a duplicate of a zip that is gone"
    assert again.duplicate_of is None
    assert (folders["media"] / again.archive).is_file()


def test_prune_idle_sweeps_forgets_only_old_sweeps_that_did_nothing(folders, drop):
    def manual(status: str = Sweep.Status.DONE, **fields: object) -> Sweep:
        return Sweep.objects.create(folder="/f", trigger="manual", status=status, **fields)

    idle, skipped = manual(), manual(Sweep.Status.SKIPPED)
    kept = [
        manual(claimed=1),
        manual(requeued=1),
        manual(Sweep.Status.FAILED, error="bad"),
        manual(Sweep.Status.HELD, error="full"),
    ]
    Sweep.objects.update(started_at=timezone.now() - timedelta(days=8))
    recent = manual()
    pruned = retention.prune_idle_sweeps(timezone.now() - timedelta(days=7), size=1)
    assert pruned == 2
    assert not Sweep.objects.filter(id__in=[idle.id, skipped.id]).exists()
    assert Sweep.objects.count() == len(kept) + 1
    assert Sweep.objects.filter(id=recent.id).exists()


def test_prune_idle_sweeps_forgets_repeated_failures_but_the_latest_of_each(folders, settings):
    # A schedule whose folder was removed fails every interval; a full disk holds every
    # sweep back: one record each time, thousands a day.
    folders["other"].rmdir()
    for _ in range(5):
        with pytest.raises(sweeper.SweepArgumentsError):
            sweeper.sweep_folder(str(folders["other"]), ["64x64"], schedule_name="inbox")
    settings.MIN_FREE_MB = 10**9
    for _ in range(5):
        sweeper.sweep_folder(str(folders["watch"]), ["64x64"], schedule_name="sweep-watch-folder")
    assert Sweep.objects.filter(status=Sweep.Status.FAILED).count() == 5
    assert Sweep.objects.filter(status=Sweep.Status.HELD).count() == 5
    latest = {"held": Sweep.objects.filter(status=Sweep.Status.HELD).latest("id").id}
    Sweep.objects.update(started_at=timezone.now() - timedelta(days=8))
    with pytest.raises(sweeper.SweepArgumentsError):  # one more, this week
        sweeper.sweep_folder(str(folders["other"]), ["64x64"], schedule_name="inbox")
    recent = Sweep.objects.latest("id")

    # The latest of each schedule, folder and status stays, however old: it still says
    # what is wrong. The failed one is this week's now.
    assert retention.prune_idle_sweeps(timezone.now() - timedelta(days=7), size=3) == 9
    assert set(Sweep.objects.values_list("id", flat=True)) == {recent.id, latest["held"]}
    assert retention.prune_idle_sweeps(timezone.now() + timedelta(days=1), size=3) == 0


def test_retention_forgets_old_webhook_deliveries_that_are_over_only(settings):
    settings.WEBHOOK_KEEP_DAYS = 30
    Status = WebhookDelivery.Status

    def delivery(status: str, days_old: int) -> WebhookDelivery:
        row = WebhookDelivery.objects.create(
            event=WebhookDelivery.Event.DONE, url="http://127.0.0.1:9/", body="{}", status=status
        )
        WebhookDelivery.objects.filter(id=row.id).update(
            created_at=timezone.now() - timedelta(days=days_old)
        )
        return row

    old_sent, old_failed = delivery(Status.SENT, 31), delivery(Status.FAILED, 31)
    kept = [
        delivery(Status.SENT, 29),
        delivery(Status.FAILED, 29),
        delivery(Status.PENDING, 60),  # still owed, however old
        delivery(Status.SENDING, 60),
    ]
    assert retention.apply_retention(dry_run=True).webhook_deliveries == 2
    assert WebhookDelivery.objects.count() == 6
    assert retention.apply_retention(batch=1).webhook_deliveries == 2
    assert not WebhookDelivery.objects.filter(id__in=[old_sent.id, old_failed.id]).exists()
    assert set(WebhookDelivery.objects.values_list("id", flat=True)) == {row.id for row in kept}
    settings.WEBHOOK_KEEP_DAYS = 0  # forever
    WebhookDelivery.objects.update(created_at=timezone.now() - timedelta(days=999))
    assert retention.apply_retention().webhook_deliveries == 0
    assert WebhookDelivery.objects.count() == 4


def test_backend_cleanup_forgets_task_results_past_result_expires(settings):
    old = TaskResult.objects.create(task_id="old", status="SUCCESS")
    TaskResult.objects.filter(id=old.id).update(
        date_done=timezone.now() - settings.CELERY_RESULT_EXPIRES - timedelta(hours=1)
    )
    TaskResult.objects.create(task_id="new", status="SUCCESS")
    # The task celery beat runs daily at 4:00 (a settings-owned entry, see jobs.beat).
    current_app.tasks["celery.backend_cleanup"]()
    assert list(TaskResult.objects.values_list("task_id", flat=True)) == ["new"]


# --- 100,000 records in a real process ------------------------------------------------------

RECORDS = 100_000
FILES = 2_000  # real files; the records share them, so most find theirs gone already


def make_history(media: Path) -> dict[str, Image]:
    """RECORDS old done images, each with a kept original and a zip; plus duplicates."""
    for area, suffix in ((storage.ORIGINALS, "jpg"), (storage.ARCHIVES, "zip")):
        folder = media / area / DAY
        folder.mkdir(parents=True)
        for number in range(FILES):
            (folder / f"{number}.{suffix}").write_bytes(b"x")
    old = timezone.now() - timedelta(days=20)
    template = Image(
        folder="/inbox",
        in_folder=False,
        file_size=1,
        mtime_ns=1,
        sizes=["64x64"],
        sizes_key="64x64",
        status=Image.Status.DONE,
        archive_size=1,
        queued_at=old,
        finished_at=old,
    )
    # Row n: its own name and hash; its files are shared, n modulo FILES.
    number = "CAST(n AS TEXT)"
    shared = f"CAST(n %% {FILES} AS TEXT)"  # %% is % once the parameters are in
    insert_series(
        template,
        RECORDS,
        {
            "name": f"{number} || '.jpg'",
            "source_path": f"'/inbox/' || {number} || '.jpg'",
            "original_path": f"'{media}/{storage.ORIGINALS}/{DAY}/' || {shared} || '.jpg'",
            "sha256": number,
            "archive": f"'{storage.ARCHIVES}/{DAY}/' || {shared} || '.zip'",
        },
    )
    used = finished(media, "used", days_old=20)
    copy = finished(media, "copy", days_old=1, status=Image.Status.DUPLICATE, duplicate_of=used)
    return {"used": used, "copy": copy}


def insert_series(template: Image, count: int, varying: dict[str, str]) -> None:
    """Insert `count` rows in one statement, made by the database: `template`'s fields,
    but for those in `varying`, SQL expressions of the row number `n`.

    bulk_create would build 100,000 model instances here, and send them some thirty rows
    a statement on SQLite; this takes a second or two on either database.
    """
    fields = [field for field in Image._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    values = [varying.get(field.attname, "%s") for field in fields]  # constants are parameters
    parameters = [
        field.get_db_prep_save(getattr(template, field.attname), connection)
        for field in fields
        if field.attname not in varying
    ]
    table = connection.ops.quote_name(Image._meta.db_table)
    # Names from the model and expressions from this module: nothing from outside.
    sql = (
        "WITH RECURSIVE series(n) AS "  # noqa: S608
        f"(SELECT 0 UNION ALL SELECT n + 1 FROM series WHERE n < {count - 1}) "
        f"INSERT INTO {table} ({columns}) SELECT {', '.join(values)} FROM series"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, parameters)


def peak_rss_of(command: list[str], environment: dict[str, str], log: Path) -> tuple[int, int]:
    """Run a command: its exit code, and its peak RSS in bytes (VmHWM, read while it runs).

    VmHWM is the process's high-water mark since it started the program, so the last
    reading holds the peak up to then. (The kernel's ru_maxrss of the child is no help:
    it counts this test process, which the child was forked from.)
    """
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=BASE_DIR, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
    peak = 0
    status_file = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            found = re.search(r"VmHWM:\s+(\d+) kB", status_file.read_text())
        except OSError:
            found = None
        if found:
            peak = max(peak, int(found.group(1)) * 1024)
        time.sleep(0.02)
    return process.returncode, peak


@pytest.mark.django_db(transaction=True)
def test_retention_of_100000_records_runs_in_batches_within_200_mb(folders, tmp_path):
    media = folders["media"]
    duplicates = make_history(media)
    environment = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "MEDIA_ROOT": str(media),
        "WATCH_FOLDER": str(folders["watch"]),
        "KEEP_ORIGINALS_DAYS": "10",
        "KEEP_ARCHIVES_DAYS": "10",
        "LOG_LEVEL": "INFO",
        "DJANGO_SECRET_KEY": "retention-test",
    }
    log = tmp_path / "retention.log"
    code, peak = peak_rss_of([sys.executable, "manage.py", "retention"], environment, log)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert 20 * 1024 * 1024 < peak < 200 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MB"

    batches = [
        tuple(map(int, found))
        for found in re.findall(
            r"retention: batch of (\d+) image\(s\), ids \d+ to \d+: "
            r"(\d+) original\(s\) and (\d+) archive\(s\) deleted",
            output,
        )
    ]
    assert max(size for size, _, _ in batches) <= retention.BATCH
    assert len(batches) == -(-(RECORDS + 2) // retention.BATCH)
    assert sum(originals for _, originals, _ in batches) == RECORDS + 1
    assert sum(archives for _, _, archives in batches) == RECORDS
    assert f"deleted {RECORDS + 1} original(s), {RECORDS} archive(s)" in output
    assert "1 old archive(s) kept for duplicates" in output

    # Every file is gone and every record forgot it, but the zip a recent duplicate uses.
    assert not list((media / storage.ORIGINALS / DAY).glob("[0-9]*.jpg"))
    assert [path.name for path in (media / storage.ARCHIVES / DAY).iterdir()] == ["used.zip"]
    left = Image.objects.exclude(id__in=[image.id for image in duplicates.values()])
    assert left.count() == RECORDS
    assert not left.exclude(original_path="").exists()
    assert not left.exclude(archive="").exists()
    used = fresh(duplicates["used"])
    assert (used.original_path, used.archive) == ("", duplicates["used"].archive)
    assert Path(fresh(duplicates["copy"]).original_path).is_file(), "a recent original stays"


# --- MIN_FREE_MB ----------------------------------------------------------------------------


@pytest.fixture
def small_media_disk(folders):
    """A real 4 MB file system mounted as MEDIA_ROOT (needs root)."""
    media = folders["media"]
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(media)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield media
    subprocess.run(["umount", str(media)], check=True)


def test_sweep_on_a_nearly_full_disk_claims_nothing_and_says_why(
    folders, drop, settings, small_media_disk
):
    settings.MIN_FREE_MB = 2
    filler = small_media_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 1024 * 1024))
    assert storage.free_bytes() < 2 * 1024 * 1024
    photo = drop(folders["watch"], "photo.jpg")

    held = sweeper.sweep_folder(str(folders["watch"]), None, schedule_name="every second")
    assert held.recorded, "held back is not idle"
    record = Sweep.objects.get()
    assert (record.status, record.claimed, held.to_queue) == (Sweep.Status.HELD, 0, [])
    assert "below MIN_FREE_MB (2 MB): nothing was claimed" in record.error
    assert "MB free on the file system of MEDIA_ROOT" in record.error
    assert not Image.objects.exists()
    assert photo.is_file()
    assert ScheduleActivity.objects.get().idle_sweeps == 0
    with pytest.raises(CommandError, match="below MIN_FREE_MB"):
        call_command("sweep", "--inline")

    filler.unlink()
    claimed = sweeper.sweep_folder(str(folders["watch"]), None, schedule_name="every second")
    assert claimed.sweep.status == Sweep.Status.DONE
    assert claimed.sweep.claimed == 1
    assert Image.objects.get().name == "photo.jpg"


@pytest.fixture
def small_archives_disk(folders):
    """A real 4 MB file system mounted as MEDIA_ROOT/archives only (needs root)."""
    with disk_of_its_own(folders, "archives", "4m") as path:
        yield path


def test_sweep_is_held_back_when_an_area_on_a_disk_of_its_own_is_nearly_full(
    folders, drop, settings, small_archives_disk
):
    # MEDIA_ROOT itself has room: the zips, on their own disk, would fail one after another.
    settings.MIN_FREE_MB = 2
    (small_archives_disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024))
    assert storage.free_bytes() >= 2 * 1024 * 1024
    photo = drop(folders["watch"], "photo.jpg")

    held = sweeper.sweep_folder(str(folders["watch"]), None)
    assert (held.sweep.status, held.sweep.claimed, held.to_queue) == (Sweep.Status.HELD, 0, [])
    assert f"of MEDIA_ROOT's archives ({small_archives_disk})" in held.sweep.error
    assert "below MIN_FREE_MB (2 MB): nothing was claimed" in held.sweep.error
    assert not Image.objects.exists()
    assert photo.is_file()

    (small_archives_disk / "filler").unlink()
    assert sweeper.sweep_folder(str(folders["watch"]), None).sweep.claimed == 1


def repair_plan(folder: Path) -> str:
    """SQLite's plan for the query a sweep's repair (sweeper.reconcile) runs on folder."""
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        sweeper.reconcile(folder)
    # The one that reads the images to repair: still in the folder, final or run out.
    repair = next(
        query["sql"]
        for query in queries
        if query["sql"].startswith("SELECT") and "lease_until" in query["sql"]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {repair}")
        return " / ".join(str(row[-1]) for row in cursor.fetchall())


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's own statistics")
def test_retention_and_migrate_give_sqlite_the_statistics_a_sweeps_repair_needs(folders):
    """Without statistics SQLite walks the status index, every finished image, for each
    sweep's repair; with them, the index of the files still in a folder."""
    media = folders["media"]
    insert_series(finished(media, "old", days_old=3), 300, {"sha256": "'s' || n"})
    finished(media, "waiting", days_old=0, status=Image.Status.PENDING, in_folder=True)
    before = repair_plan(Path("/inbox"))
    assert "one_claim_per_waiting_file" not in before, before
    retention.apply_retention()
    assert "USING INDEX one_claim_per_waiting_file" in repair_plan(Path("/inbox"))
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM sqlite_stat1")
        cursor.execute("ANALYZE sqlite_schema")  # the planner reads them again
    assert repair_plan(Path("/inbox")) == before
    call_command("migrate", verbosity=0)
    assert "USING INDEX one_claim_per_waiting_file" in repair_plan(Path("/inbox"))

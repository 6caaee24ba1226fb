"""Forgetting what is old: kept originals and archives past their retention, idle sweeps.

KEEP_ORIGINALS_DAYS and KEEP_ARCHIVES_DAYS (0: forever, the default) say how long the files
of a finished image are kept; its record stays, saying what went. Sweep records that
claimed nothing go after IDLE_SWEEP_DAYS, sent and failed webhook deliveries after
WEBHOOK_KEEP_DAYS (0: forever). Task results past RESULT_EXPIRES_DAYS are
Celery's own business (`celery.backend_cleanup`, a settings-owned beat entry).

The images are walked in batches of at most BATCH by primary key (keyset), so each batch
is one bounded query and memory stays flat whatever the history. Files go before rows:
each batch's images are locked, their files deleted through jobs.storage, then the rows
cleared, in one transaction. A crash in between leaves rows pointing at files already
gone, which the next run clears (gone counts as deleted). The lock keeps a reprocess or a
new duplicate from taking a file while it is deleted. An archive stays while a duplicate
that is itself within retention gets its zip from it.

Each run also refreshes SQLite's query-planner statistics (refresh_planner_statistics), as
every `migrate` does: history is what makes them matter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Case, F, Max, Q, TextField, Value, When
from django.db.models.functions import Concat
from django.utils import timezone

from . import storage
from .models import Image, Sweep, WebhookDelivery

logger = logging.getLogger(__name__)

# Rows per batch: one query to read them, one to lock the old ones, one to clear each kind.
BATCH = 1000
# What decides whether an image's files are past retention.
FIELDS = ("id", "status", "in_folder", "finished_at", "original_path", "archive")
# Rows of each index SQLite reads to gather its statistics: enough to tell a selective
# index from one that is not, in about a millisecond whatever the history (200,000 images).
ANALYSIS_LIMIT = 1000


@dataclass
class Report:
    """What a retention run deleted (or, dry, would delete)."""

    originals: int = 0
    archives: int = 0
    kept_for_duplicates: int = 0
    not_deleted: int = 0
    idle_sweeps: int = 0
    webhook_deliveries: int = 0
    batches: int = 0

    def counts(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Cutoffs:
    """Files of images finished before these are past retention; None keeps them."""

    originals: datetime | None
    archives: datetime | None

    def original(self, row: Any) -> bool:
        return (
            self.originals is not None
            and _finished_before(row, self.originals)
            and not row.in_folder
            and bool(row.original_path)
        )

    def archive(self, row: Any) -> bool:
        return (
            self.archives is not None and _finished_before(row, self.archives) and bool(row.archive)
        )


def _finished_before(row: Any, cutoff: datetime) -> bool:
    return (
        row.status in Image.FINAL_STATUSES
        and row.finished_at is not None
        and row.finished_at < cutoff
    )


def apply_retention(
    *, dry_run: bool = False, now: datetime | None = None, batch: int = BATCH
) -> Report:
    """Delete what is past its retention now; with `dry_run`, only count it."""
    now = now or timezone.now()
    report = Report()
    originals, archives = settings.KEEP_ORIGINALS_DAYS, settings.KEEP_ARCHIVES_DAYS
    cutoffs = Cutoffs(
        now - timedelta(days=originals) if originals else None,
        now - timedelta(days=archives) if archives else None,
    )
    if cutoffs.originals or cutoffs.archives:
        note = (
            f"archive deleted on {timezone.localdate(now):%Y-%m-%d}: older than "
            f"KEEP_ARCHIVES_DAYS ({archives} days)"
        )
        for rows in walk(Image, FIELDS, batch):
            _expire(rows, cutoffs, note, report, dry_run)
    report.idle_sweeps = prune_idle_sweeps(
        now - timedelta(days=settings.IDLE_SWEEP_DAYS), batch, dry_run
    )
    if settings.WEBHOOK_KEEP_DAYS:
        report.webhook_deliveries = prune_webhook_deliveries(
            now - timedelta(days=settings.WEBHOOK_KEEP_DAYS), batch, dry_run
        )
    if not dry_run:
        refresh_planner_statistics()
    return report


def refresh_planner_statistics(using: str = "default", **kwargs: Any) -> None:
    """SQLite: gather the statistics its query planner chooses indexes by (ANALYZE).

    SQLite keeps none until asked, and without them it guessed that a sweep's repair query
    (the folder's images still there, final or with their lease run out) should walk the
    status index, which holds every finished image: with 200,000 images of history an idle
    sweep took 116 ms instead of 12, and sixty schedules outran the worker. With them it
    reads the index of files still in a folder. Statistics of empty tables are none, so
    this is harmless on a new database. PostgreSQL's autovacuum gathers its own. Also a
    post_migrate receiver (jobs/apps.py): `using` and the signal's other arguments.
    """
    connection = connections[using]
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
        cursor.execute("ANALYZE")


def walk(model: type[Any], fields: tuple[str, ...], size: int) -> Iterator[list[Any]]:
    """Every row of `model`, at most `size` a query, in primary-key order.

    Judged by the caller rather than filtered here: with conditions on indexed fields,
    SQLite (which keeps no statistics) walks the status index and sorts every batch,
    reading the whole history once per batch instead of once.
    """
    last = 0
    while True:
        rows = list(
            model.objects.filter(id__gt=last).order_by("id").values_list(*fields, named=True)[:size]
        )
        if not rows:
            return
        yield rows
        last = rows[-1].id


def _expire(rows: list[Any], cutoffs: Cutoffs, note: str, report: Report, dry_run: bool) -> None:
    """Delete the old files of one batch of images, then clear them from the rows."""
    old = [row.id for row in rows if cutoffs.original(row) or cutoffs.archive(row)]
    if not old:
        return
    if dry_run:
        _count(rows, cutoffs, report)
        return
    with transaction.atomic():
        # Read again under the lock: a reprocess or a duplicate may have come meanwhile.
        locked = list(
            Image.objects.filter(id__in=old)
            .order_by("id")
            .select_for_update()
            .values_list(*FIELDS, named=True)
        )
        originals, archives = _old_files(locked, cutoffs, report)
        gone = set(storage.remove_kept_originals(originals.values()))
        cleared = [image_id for image_id, path in originals.items() if path in gone]
        gone = set(storage.remove_archives(archives.values()))
        expired = [image_id for image_id, path in archives.items() if path in gone]
        _clear(cleared, expired, note)
    report.originals += len(cleared)
    report.archives += len(expired)
    report.not_deleted += len(originals) + len(archives) - len(cleared) - len(expired)
    report.batches += 1
    logger.info(
        "retention: batch of %d image(s), ids %d to %d: %d original(s) and %d archive(s) deleted",
        len(rows),
        rows[0].id,
        rows[-1].id,
        len(cleared),
        len(expired),
    )


def _old_files(
    rows: list[Any], cutoffs: Cutoffs, report: Report
) -> tuple[dict[int, str], dict[int, str]]:
    """Image id -> kept original, and image id -> archive, of the files past retention."""
    originals = {row.id: row.original_path for row in rows if cutoffs.original(row)}
    archives = {row.id: row.archive for row in rows if cutoffs.archive(row)}
    used = _used_by_recent_duplicates(list(archives), cutoffs.archives)
    report.kept_for_duplicates += len(used)
    return originals, {
        image_id: path for image_id, path in archives.items() if image_id not in used
    }


def _count(rows: list[Any], cutoffs: Cutoffs, report: Report) -> None:
    originals, archives = _old_files(rows, cutoffs, report)
    report.originals += len(originals)
    report.archives += len(archives)


def _used_by_recent_duplicates(image_ids: list[int], cutoff: datetime | None) -> set[int]:
    """Those of `image_ids` whose zip a duplicate finished since `cutoff` still uses."""
    if not image_ids or cutoff is None:
        return set()
    # Only duplicates point to another image (a reprocess clears the link).
    return {
        first
        for first, status, finished_at in Image.objects.filter(
            duplicate_of__in=image_ids
        ).values_list("duplicate_of", "status", "finished_at")
        if first is not None
        and status == Image.Status.DUPLICATE
        and (finished_at is None or finished_at >= cutoff)
    }


def prune_idle_sweeps(before: datetime, size: int = BATCH, dry_run: bool = False) -> int:
    """Forget sweep records started before `before` that claimed and requeued nothing:
    done or skipped ones without an error, and failed or held-back ones but the latest of
    each schedule, folder and status (it still says what is wrong).

    Idle scheduled sweeps leave no record any more (their schedule's activity counts
    them); these are the ones asked for by hand, the ones that only put an original away,
    those skipped while another sweep ran, those a missing folder or a full disk leaves
    every interval, and those recorded before.
    """
    pruned = 0
    fields = ("id", "started_at", "status", "claimed", "requeued", "error")
    # A schedule whose folder is gone, or a disk that stays full, records a failed or held
    # sweep every interval: past IDLE_SWEEP_DAYS those go too, but for the latest of each
    # folder and schedule, which still tells what is wrong.
    repeated = (Sweep.Status.FAILED, Sweep.Status.HELD)
    latest = set(
        Sweep.objects.filter(status__in=repeated)
        .values("schedule_name", "folder", "status")
        .annotate(last=Max("id"))
        .values_list("last", flat=True)
    )
    for rows in walk(Sweep, fields, size):
        idle = [
            row.id
            for row in rows
            if row.started_at < before
            and not (row.claimed or row.requeued)
            and (
                (row.status in (Sweep.Status.DONE, Sweep.Status.SKIPPED) and not row.error)
                or (row.status in repeated and row.id not in latest)
            )
        ]
        if idle and not dry_run:
            Sweep.objects.filter(id__in=idle).delete()
        pruned += len(idle)
    return pruned


def prune_webhook_deliveries(before: datetime, size: int = BATCH, dry_run: bool = False) -> int:
    """Forget webhook deliveries made before `before` that are over: sent, or failed for
    good. Pending and sending ones stay, however old: they are still owed."""
    over = WebhookDelivery.objects.filter(
        created_at__lt=before,
        status__in=(WebhookDelivery.Status.SENT, WebhookDelivery.Status.FAILED),
    ).order_by()
    if dry_run:
        return over.count()
    pruned = 0
    while ids := list(over.values_list("id", flat=True)[:size]):
        pruned += WebhookDelivery.objects.filter(id__in=ids).delete()[0]
    return pruned


def _clear(originals: list[int], archives: list[int], note: str) -> None:
    """Forget the deleted files on their rows, in one statement: each row is written once."""
    if not originals and not archives:
        return
    gone = Q(id__in=archives)
    noted = Case(
        When(error="", then=Value(note)),
        default=Concat(F("error"), Value(f"; {note}"), output_field=TextField()),
        output_field=TextField(),
    )
    Image.objects.filter(id__in=[*originals, *archives]).update(
        original_path=Case(When(id__in=originals, then=Value("")), default=F("original_path")),
        archive=Case(When(gone, then=Value("")), default=F("archive")),
        archive_size=Case(When(gone, then=None), default=F("archive_size")),
        error=Case(When(gone, then=noted), default=F("error")),
    )

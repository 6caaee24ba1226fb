"""Finding ready files, claiming them and putting originals away, through jobs.storage.

The watched folder and the database are the truth; a broker message is only a nudge. So a
sweep both claims new files and repairs whatever a crash left half done (reconciliation).
`sweep_folder` is the one way to sweep; the Celery task, `manage.py sweep` and the
benchmarks call it. No image work happens here.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from . import beat, leases, storage
from .models import LEASE_EXPIRED, Image, ScheduleActivity, Sweep, SweepLock
from .pipeline import (
    COLOUR_CHOICES,
    FIT_CHOICES,
    FORMAT_CHOICES,
    GRAVITY_CHOICES,
    METADATA_CHOICES,
    parse_sizes,
)
from .storage import Arrival, Candidate, discard_dead_run_archives, kept_path, scan

logger = logging.getLogger(__name__)

# The Celery task that sweeps (jobs.tasks), by the name periodic tasks store.
SWEEP_TASK = "jobs.sweep_folder"
CLAIM_BATCH = 500


class FolderRejected(ValueError):
    """A folder a sweep may not touch; the message says why."""


class SweepArgumentsError(ValueError):
    """A sweep was sent arguments it cannot use (a periodic task's kwargs edited by hand)."""


@dataclass(frozen=True)
class Requeue:
    """When a pending image's message counts as lost, to be sent again.

    Queued more than `after` seconds ago (None: REQUEUE_AFTER); and when the broker said how
    many image messages wait in the queue (`held`), only as many of those as the queue
    lacks, oldest first. In a backlog
    every pending image's message is still in the queue: sending them all again each
    REQUEUE_AFTER would grow the queue by the backlog every minute and reset each image's
    wait, hiding the backlog's age from /metrics and the dashboard.
    """

    after: float | None = None
    held: int | None = None


@dataclass
class Repairs:
    """What a repair did: image ids to queue again (`uploads` those of them uploaded, for the
    upload queue), and images it settled otherwise (originals put away after a crash, runs
    failed after MAX_ATTEMPTS)."""

    requeue: list[int] = field(default_factory=list)
    uploads: set[int] = field(default_factory=set)
    settled: int = 0


@dataclass
class SweepOutcome:
    sweep: Sweep
    to_queue: list[int] = field(default_factory=list)
    # Those of to_queue that were uploaded (repairs of lost messages may take any image).
    uploads: set[int] = field(default_factory=set)
    settled: int = 0
    # False when the sweep turned out idle and left no record (see is_idle).
    recorded: bool = True

    def summary(self) -> dict[str, object]:
        """A few figures for a task's result and the logs."""
        return {
            "sweep": self.sweep.id if self.recorded else None,
            "status": self.sweep.status,
            "claimed": self.sweep.claimed,
            "requeued": self.sweep.requeued,
            "unstable": self.sweep.unstable,
        }


def this_worker() -> str:
    """A label for people reading the admin; nothing decides by it (hosts reuse PIDs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_folder(folder: str | os.PathLike[str] | None) -> Path:
    """The absolute folder a sweep may work in, or FolderRejected saying why not."""
    if folder is None or str(folder).strip() == "":
        folder = str(settings.WATCH_FOLDER)
    if not isinstance(folder, str | os.PathLike):
        raise FolderRejected(f"folder must be a path string, got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_absolute():
        raise FolderRejected(f"folder must be an absolute path, got {str(folder)!r}")
    path = path.resolve()
    media_root = Path(settings.MEDIA_ROOT).resolve()
    if path == media_root or path.is_relative_to(media_root) or media_root.is_relative_to(path):
        raise FolderRejected(f"folder {path} overlaps MEDIA_ROOT {media_root}")
    if not any(path.is_relative_to(Path(root).resolve()) for root in settings.WATCH_ROOTS):
        roots = ", ".join(str(root) for root in settings.WATCH_ROOTS)
        raise FolderRejected(f"folder {path} is outside the allowed WATCH_ROOTS ({roots})")
    if not path.is_dir():
        raise FolderRejected(f"folder {path} does not exist or is not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise FolderRejected(f"folder {path} is not readable and writable by this process")
    return path


def resolve_sizes(sizes: Iterable[str] | str | None) -> list[str]:
    """Size labels from a task's kwargs, or the configured defaults; ValueError if bad."""
    # The defaults are normalised like any sizes: the same sizes make the same sizes_key,
    # whichever way they came, or the same content would not be found a duplicate.
    parsed = parse_sizes(settings.THUMBNAIL_SIZES if sizes is None else sizes)
    if not parsed:
        raise ValueError("sizes must name at least one size like 128x128")
    return [size.label for size in parsed]


# Thumbnail quality a sweep may ask for (JPEG and WebP); above 95 Pillow's JPEGs grow much
# larger for hardly any gain.
MIN_QUALITY, MAX_QUALITY = 1, 95
# The output preset's choices, and the pipeline's own default for each (never stored).
PRESET_CHOICES = {
    "format": (FORMAT_CHOICES, "same"),
    "fit": (FIT_CHOICES, "contain"),
    "gravity": (GRAVITY_CHOICES, "centre"),
    "metadata": (METADATA_CHOICES, "strip"),
    "colour": (COLOUR_CHOICES, "srgb"),
}
OPTION_NAMES = ("quality", *PRESET_CHOICES, "gps")


def resolve_options(raw: Mapping[str, object] | None) -> dict[str, object]:
    """Output options from a task's kwargs, without the ones left to defaults; ValueError if bad.

    `raw` holds every keyword a sweep was sent besides folder and sizes: a name that is not
    an option is refused, so a typo in hand-written kwargs cannot pass unnoticed. A preset
    not asked for takes the settings' default (THUMBNAIL_FORMAT, ...), recorded when it is
    not the pipeline's own, so that the same content made another way is no duplicate.
    """
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        accepted = ", ".join(("folder", "sizes", *OPTION_NAMES))
        raise ValueError(f"unknown argument(s) {names}; a sweep takes only {accepted}")
    options: dict[str, object] = {}
    for name, (choices, default) in PRESET_CHOICES.items():
        value = raw.get(name)
        if value is None or value == "":
            value = getattr(settings, f"THUMBNAIL_{name.upper()}", default)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if value != default:
            options[name] = value
    gps = raw.get("gps")
    if gps not in (None, False, True):
        raise ValueError(f"gps must be true or false, got {gps!r}")
    if gps:
        if options.get("metadata") != "keep":
            raise ValueError("gps=true keeps GPS in kept metadata: it needs metadata=keep")
        options["gps"] = True
    quality = raw.get("quality")
    if quality is not None:
        if (
            not isinstance(quality, int)
            or isinstance(quality, bool)
            or not MIN_QUALITY <= quality <= MAX_QUALITY
        ):
            raise ValueError(
                f"quality must be a whole number from {MIN_QUALITY} to {MAX_QUALITY}, "
                f"got {quality!r}"
            )
        options["quality"] = quality
    return options


def sweep_folder(
    folder: str | None,
    sizes: Iterable[str] | str | None,
    *,
    schedule_name: str = "",
    task_id: str = "",
    options: Mapping[str, object] | None = None,
    requeue: Requeue = Requeue(),
    arrived: Iterable[Arrival] = (),
) -> SweepOutcome:
    """Sweep one folder: record the sweep, repair what a crash left, scan, claim.

    Returns the outcome, with the image ids to queue: the caller queues them once the
    claims are committed. A sweep sent by a schedule (`schedule_name`) that found nothing
    to do is never recorded: the schedule's activity counts it instead (see is_idle). Any
    other sweep is recorded; a person who asked reads the answer there. `requeue` and
    `arrived` are as for run_sweep. Raises SweepArgumentsError, after recording the failed
    sweep, when the folder, sizes or output options cannot be used.
    """
    record, path, labels = start_sweep(
        folder,
        sizes,
        trigger=Sweep.Trigger.SCHEDULE if schedule_name else Sweep.Trigger.MANUAL,
        schedule_name=schedule_name,
        task_id=task_id,
        options=options,
    )
    if path is None:
        _note_activity(SweepOutcome(record))
        raise SweepArgumentsError(record.error)
    try:
        outcome = run_sweep(
            record,
            path,
            labels,
            exclude=other_sweep_folders(path),
            requeue=requeue,
            arrived=arrived,
        )
    except Exception:
        _note_activity(SweepOutcome(record))
        raise
    _note_activity(outcome)
    return outcome


def is_idle(outcome: SweepOutcome) -> bool:
    """A scheduled sweep with nothing to tell: it claimed, requeued and repaired nothing
    and has no error (a file still changing is recorded by the sweep that takes it; one
    that never settles would otherwise add a record every interval), or it was skipped
    because another sweep of the folder was running (that one tells). Sweeps someone
    asked for by hand, failed ones and ones held back for want of disk space are never
    idle."""
    sweep = outcome.sweep
    if sweep.trigger != Sweep.Trigger.SCHEDULE:
        return False
    if sweep.status not in (Sweep.Status.DONE, Sweep.Status.SKIPPED):
        return False
    if sweep.claimed or sweep.requeued or outcome.settled:
        return False
    # A note (names left in place) that this schedule's last record of the folder gave
    # already is no news: told once, not every interval for as long as the files stay.
    return not sweep.error or sweep.error == _last_note(sweep)


def _last_note(sweep: Sweep) -> str | None:
    return (
        Sweep.objects.filter(
            trigger=Sweep.Trigger.SCHEDULE, schedule_name=sweep.schedule_name, folder=sweep.folder
        )
        .exclude(pk=sweep.pk)
        .order_by("-id")
        .values_list("error", flat=True)
        .first()
    )


def _note_activity(outcome: SweepOutcome) -> None:
    """Count an idle sweep on its schedule, or note the one recorded."""
    sweep = outcome.sweep
    if sweep.trigger != Sweep.Trigger.SCHEDULE or not sweep.schedule_name:
        return
    if outcome.recorded:
        ScheduleActivity.note_recorded(sweep)
    else:
        # A skipped sweep did not run: it is counted, but it is no sign of a good sweep
        # (the one holding the folder may hang for good).
        ScheduleActivity.note_idle(sweep.schedule_name, ran=sweep.status == Sweep.Status.DONE)


def scheduled_folders(exclude: Iterable[int] = ()) -> dict[Path, str]:
    """The folders enabled periodic sweeps look after, resolved, each with the name of its
    schedule (the oldest, should two share one); `exclude`: ids of schedules left out."""
    folders: dict[Path, str] = {}
    schedules = PeriodicTask.objects.filter(task=SWEEP_TASK, enabled=True).exclude(
        pk__in=list(exclude)
    )
    for task in schedules.order_by("pk").only("name", "kwargs"):
        folder = beat.named_folder(task)
        if folder is not None:
            folders.setdefault(Path(folder).resolve(), task.name)
    return folders


def other_sweep_folders(folder: Path) -> list[Path]:
    """Folders below `folder` that an enabled periodic sweep of their own looks after."""
    return [
        other for other in scheduled_folders() if other != folder and other.is_relative_to(folder)
    ]


def start_sweep(
    folder: str | None,
    sizes: Iterable[str] | str | None,
    *,
    trigger: str,
    schedule_name: str = "",
    task_id: str = "",
    options: Mapping[str, object] | None = None,
) -> tuple[Sweep, Path | None, list[str]]:
    """A sweep with its arguments resolved; if they are bad it is recorded, failed, saying so.

    A sweep someone asked for is recorded at once: the "sweep now" page waits for it by
    task id. A scheduled one is recorded only once it has something to tell (see run_sweep).
    `options` are the output options (see resolve_options); the resolved ones are kept on
    the sweep, and each image it claims gets them.
    """
    sweep = Sweep(
        trigger=trigger,
        schedule_name=schedule_name,
        folder=str(folder if folder is not None else settings.WATCH_FOLDER)[:1024],
        sizes=sizes if isinstance(sizes, list) else [],
        task_id=task_id,
    )
    try:
        path = resolve_folder(folder)
        labels = resolve_sizes(sizes)
        resolved = resolve_options(options)
    except ValueError as exc:
        sweep.finish(Sweep.Status.FAILED, f"bad sweep arguments: {exc}")
        return sweep, None, []
    sweep.folder = str(path)
    sweep.sizes = labels
    sweep.options = resolved
    if trigger != Sweep.Trigger.SCHEDULE:
        sweep.save()
    return sweep, path, labels


def run_sweep(
    sweep: Sweep,
    folder: Path,
    sizes: list[str],
    exclude: Iterable[Path] = (),
    requeue: Requeue = Requeue(),
    arrived: Iterable[Arrival] = (),
) -> SweepOutcome:
    """Repair what a crash left, then claim every ready file. Returns image ids to queue.

    Ready: settled (unchanged for SETTLE_SECONDS), or renamed in and unchanged since
    (`arrived`, from the watch: see storage.Arrival).

    Pending images whose message is taken as lost (see Requeue) are queued again. With less
    than MIN_FREE_MB free where MEDIA_ROOT or one of its areas lives, nothing is touched and
    the sweep is held back, saying why: every image would fail on the full disk, while files
    left in the folder lose nothing.
    The sweep is recorded at its end, unless it is idle (see is_idle).
    """
    outcome = SweepOutcome(sweep)
    short = space_shortage()
    if short:
        sweep.finish(Sweep.Status.HELD, short)
        return outcome
    owner = acquire_lock(folder)
    if owner is None:
        _finish(outcome, Sweep.Status.SKIPPED)
        return outcome
    try:
        # Renewed while this sweep runs: a sweep killed mid-way holds the folder no longer
        # than one lease.
        with leases.renewed(
            lambda: SweepLock.renew(str(folder), owner), f"the sweep lock on {folder}"
        ):
            repairs = reconcile(folder, requeue)
            # Read before listing the folder: a file whose claim is released after this read
            # was moved away before it, so the listing cannot show it again.
            waiting = waiting_paths(folder)
            found = scan(folder, settings.SETTLE_SECONDS, exclude, arrived)
            claimed = claim(sweep, found.ready, sizes, waiting)
            sweep.seen = len(found.ready) + found.unstable
            sweep.unstable = found.unstable
            sweep.ignored = found.ignored
            sweep.claimed = len(claimed)
            sweep.requeued = len(repairs.requeue)
            outcome.to_queue = repairs.requeue + claimed
            outcome.uploads = repairs.uploads
            outcome.settled = repairs.settled
            _finish(outcome, Sweep.Status.DONE, _unstorable_note(found.unstorable))
    except Exception as exc:
        # Recorded for the admin, then raised for Celery's result row and the logs.
        sweep.finish(Sweep.Status.FAILED, f"sweep stopped: {exc!r}")
        raise
    finally:
        release_lock(folder, owner)
    return outcome


def _finish(outcome: SweepOutcome, status: str, error: str = "") -> None:
    """Record the end of a sweep, unless it turned out idle: then no record is left."""
    sweep = outcome.sweep
    sweep.status, sweep.error = status, error
    if not is_idle(outcome):
        sweep.finish(status, error)
        return
    sweep.finished_at = timezone.now()
    outcome.recorded = False
    if sweep.pk is not None:
        # It had rows to claim, but another sweep claimed them all first.
        Sweep.objects.filter(id=sweep.pk).delete()


def space_shortage() -> str:
    """Why a sweep may not claim for want of disk space; empty when there is enough."""
    if not settings.MIN_FREE_MB:
        return ""
    try:
        place, free = storage.media_free_bytes()
    except OSError as exc:
        # Not knowing is no reason to stop: writing the archive reports a full disk anyway.
        logger.warning("cannot read the free space of %s: %s", settings.MEDIA_ROOT, exc)
        return ""
    if free >= settings.MIN_FREE_MB * 1024 * 1024:
        return ""
    where = "MEDIA_ROOT" if place == Path(settings.MEDIA_ROOT) else f"MEDIA_ROOT's {place.name}"
    return (
        f"only {free / 1024 / 1024:.1f} MB free on the file system of {where} "
        f"({place}), below MIN_FREE_MB ({settings.MIN_FREE_MB} MB): nothing "
        "was claimed; the files wait in the folder until space is freed"
    )


def _unstorable_note(names: list[str]) -> str:
    if not names:
        return ""
    shown = "; ".join(names[:20]) + (f"; and {len(names) - 20} more" if len(names) > 20 else "")
    return (
        f"{len(names)} file(s) left in place: their names are not valid UTF-8 or longer than "
        f"{storage.MAX_STORED_NAME} characters, so they cannot be recorded; rename them: {shown}"
    )


def acquire_lock(folder: Path) -> uuid.UUID | None:
    """Hold the folder for one sweep: the token to release it with, or None if it is held."""
    return SweepLock.acquire(str(folder))


def release_lock(folder: Path, owner: uuid.UUID) -> None:
    SweepLock.release(str(folder), owner)


def waiting_paths(folder: Path) -> set[str]:
    """Paths under folder already claimed by an image whose original has not moved on."""
    prefix = str(folder).rstrip("/") + "/"
    return set(
        Image.objects.filter(in_folder=True, source_path__startswith=prefix)
        .order_by()
        .values_list("source_path", flat=True)
    )


def claim(
    sweep: Sweep, ready: list[Candidate], sizes: list[str], waiting: set[str] | None = None
) -> list[int]:
    """Insert one pending row per new file; rows this sweep inserted are its claims.

    Each row gets the sweep's output options.
    """
    if not ready:
        return []
    if waiting is None:
        waiting = waiting_paths(Path(sweep.folder))
    now = timezone.now()
    rows = [
        Image(
            sweep=sweep,
            schedule_name=sweep.schedule_name,
            folder=sweep.folder,
            name=candidate.name,
            source_path=str(candidate.path),
            file_size=candidate.size,
            mtime_ns=candidate.mtime_ns,
            device=candidate.device,
            inode=candidate.inode,
            sizes=sizes,
            sizes_key=Image.sizes_key_for(sizes, sweep.options),
            options=sweep.options,
            queued_at=now,
        )
        for candidate in ready
        if str(candidate.path) not in waiting
    ]
    if not rows:
        return []
    if sweep.pk is None:
        sweep.save()  # a scheduled sweep is recorded once it has something to claim
    # Another sweep (another beat, a manual sweep, a nested folder) may claim the same file
    # between our read and our insert: the partial unique index makes one insert win.
    Image.objects.bulk_create(rows, batch_size=CLAIM_BATCH, ignore_conflicts=True)
    return list(
        Image.objects.filter(sweep=sweep, status=Image.Status.PENDING)
        .order_by()
        .values_list("id", flat=True)
    )


def reconcile(folder: Path, requeue: Requeue = Requeue()) -> Repairs:
    """Repair images waiting under folder that a crash or a lost message left behind.

    Returns the ids to queue again. Images already final but whose original was never
    moved are put away now; a run whose lease ran out is retried until MAX_ATTEMPTS.
    """
    prefix = str(folder).rstrip("/") + "/"
    return _repair(Image.objects.filter(in_folder=True, source_path__startswith=prefix), requeue)


def recover_unswept(requeue: Requeue = Requeue()) -> Repairs:
    """The same repair for images no sweep looks after: uploads and reprocessing, and the
    images of folders that no enabled schedule sweeps (swept by hand, or their schedule
    was switched off since).

    Uploads and reprocessed images are read from MEDIA_ROOT (uploads/, or originals/ and
    failed/ when an image is processed again), a place no sweep lists. Every repair is a
    conditional update, so one that a sweep does at the same moment is done once.
    """
    prefix = str(settings.MEDIA_ROOT).rstrip("/") + "/"
    open_work = Q(in_folder=True) | Q(status__in=(Image.Status.PENDING, Image.Status.PROCESSING))
    covered = Q()
    for folder in scheduled_folders():  # sweep-watch-folder among them while enabled
        covered |= Q(source_path__startswith=str(folder).rstrip("/") + "/")
    images = Image.objects.filter(open_work)
    if covered:
        images = images.filter(Q(source_path__startswith=prefix) | ~covered)
    return _repair(images, requeue)


def _repair(waiting: QuerySet[Image], requeue: Requeue) -> Repairs:
    now = timezone.now()
    repairs = Repairs()
    # No ordering: the model's default (-queued_at) would make the database walk that index.
    waiting = waiting.order_by()
    # Runs with a live lease are never read here, wherever they run.
    for image in waiting.filter(Q(status__in=Image.FINAL_STATUSES) | LEASE_EXPIRED):
        try:
            if image.is_final:
                put_original_away(image)
                repairs.settled += 1
            else:
                retried = _retry_or_fail(image)
                repairs.requeue.extend(retried)
                if image.source == Image.Source.UPLOAD:
                    repairs.uploads.update(retried)
                if image.status == Image.Status.FAILED:
                    repairs.settled += 1  # failed at last, after MAX_ATTEMPTS
        except OSError as exc:
            # One stuck original must not stop the sweep; it is tried again next time.
            logger.warning("cannot put away the original of image %s: %s", image.id, exc)
    after = settings.REQUEUE_AFTER if requeue.after is None else requeue.after
    cutoff = now - timedelta(seconds=after)
    stale: QuerySet[Image] | None
    if requeue.held is None:
        stale = waiting.filter(status=Image.Status.PENDING, queued_at__lt=cutoff)
    else:
        # The queue lacks messages of pending images anywhere, not only of this folder's:
        # make up for the oldest of all (the lost message's image is the oldest waiting),
        # or a busy folder's sweeps spend every missing message on their own images.
        pending = Image.objects.filter(status=Image.Status.PENDING)
        lacking = pending.count() - requeue.held
        # Nearly always none lacks (each pending image's message waits in the queue): then
        # no query is built at all, which took 0.14 ms of every sweep on SQLite for none.
        stale = (
            pending.filter(queued_at__lt=cutoff).order_by("queued_at", "id")[:lacking]
            if lacking > 0
            else None
        )
    lost = dict(stale.values_list("id", "source")) if stale is not None else {}
    if lost:
        # The message may be sitting in the queue still: a second copy is harmless, since
        # only one run can move the image from pending to processing.
        marked = Image.objects.requeue_lost(list(lost), queued_before=cutoff)
        repairs.requeue.extend(marked)
        repairs.uploads.update(i for i in marked if lost[i] == Image.Source.UPLOAD)
    return repairs


def _retry_or_fail(image: Image) -> list[int]:
    """Take over an image whose run's lease ran out: queue it again, or fail it at last."""
    outcome = image.retry(settings.MAX_ATTEMPTS)
    if outcome is None:
        return []  # its run renewed the lease meanwhile, or another sweep took it over
    discard_dead_run_archives(image, requeued=outcome == Image.Status.PENDING)
    if outcome == Image.Status.FAILED:
        put_original_away(image)
        return []
    logger.warning(
        "image %s: the lease of its run on %s ran out; queueing it again", image.id, image.worker
    )
    return [image.id]


def work_is_stalled(window: timedelta, beat_running: bool) -> bool:
    """True when nothing started for `window` although work waits: a stuck worker.

    Sweeps count as work: a running beat sends one every interval, and a live worker
    records each one it runs (an idle one in its schedule's activity).
    """
    since = timezone.now() - window
    if Sweep.objects.filter(started_at__gte=since).exists():
        return False
    if ScheduleActivity.objects.filter(swept_at__gte=since).exists():
        return False
    if Image.objects.filter(started_at__gte=since).exists():
        return False
    return beat_running or (
        Image.objects.filter(status=Image.Status.PENDING, queued_at__lt=since).exists()
    )


# --- Putting originals away -----------------------------------------------------------


def put_original_away(image: Image) -> None:
    """Move a final image's original out of the watched folder and record where it went.

    Idempotent, and safe when a worker and a sweep's repair both get here: whoever renames
    second finds the original already at its destination. The original moves only while
    it is still the file that was claimed, reached without following a link; otherwise it
    stays where it is and the image says why.
    """
    note = f"{image.name}\n{image.error}\n" if image.status == Image.Status.FAILED else None
    left = ""
    try:
        kept = storage.move_original(
            Path(image.source_path), storage.FileIdentity.claimed(image), kept_path(image), note
        )
    except storage.FileChanged as exc:
        # Someone replaced the file after it was claimed: the new one is not this image's
        # (the next sweep claims it); this image's bytes are in its archive, if any.
        kept, left = None, f"{exc} (replaced after the claim)"
    except storage.NotBeneath as exc:
        kept, left = None, str(exc)
    recorded: dict[str, object] = {"in_folder": False, "original_path": str(kept or "")}
    if left:
        logger.warning("image %s: original left where it was found: %s", image.id, left)
        left = f"the original was left where it was found: {left}"
        image.error = f"{image.error}; {left}" if image.error else left
        recorded["error"] = image.error
    Image.objects.filter(id=image.id).update(**recorded)
    image.in_folder = False
    image.original_path = str(kept or "")

"""The file-system side of Parroter: finding ready files, claiming them, putting originals away.

The watched folder and the database are the truth; a broker message is only a nudge. So a
sweep both claims new files and repairs whatever a crash left half done (reconciliation).
No image work happens here.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from . import outcomes
from .models import Image, Sweep, SweepLock
from .pipeline import parse_sizes, safe_stem
from .storage import fsync_directory

logger = logging.getLogger(__name__)

# Names a person or a program leaves while a file is still arriving, and system clutter.
JUNK_PATTERNS = (".*", "~*", "*.part", "*.tmp", "*.crdownload", "*.download", "Thumbs.db")
JUNK_DIRECTORIES = ("__MACOSX",)
MAX_NAME_BYTES = 200
CLAIM_BATCH = 500
# The lengths of Image.name and Image.source_path.
MAX_STORED_NAME = 1024
MAX_STORED_PATH = 2048
LOCK_SLACK = timedelta(minutes=5)


class FolderRejected(ValueError):
    """A folder a sweep may not touch; the message says why."""


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str
    size: int
    mtime_ns: int


@dataclass
class Scan:
    ready: list[Candidate] = field(default_factory=list)
    unstable: int = 0
    ignored: int = 0
    # Files whose names the database cannot hold (not UTF-8, or too long): left in place.
    unstorable: list[str] = field(default_factory=list)


@dataclass
class SweepOutcome:
    sweep: Sweep
    to_queue: list[int] = field(default_factory=list)


def this_worker() -> str:
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
    if sizes is None:
        return list(settings.THUMBNAIL_SIZES)
    parsed = parse_sizes(sizes)
    if not parsed:
        raise ValueError("sizes must name at least one size like 128x128")
    return [size.label for size in parsed]


# Thumbnail quality a sweep may ask for (JPEG and WebP); above 95 Pillow's JPEGs grow much
# larger for hardly any gain.
MIN_QUALITY, MAX_QUALITY = 1, 95
OPTION_NAMES = ("quality",)


def resolve_options(raw: Mapping[str, object] | None) -> dict[str, int]:
    """Output options from a task's kwargs, without the ones left to defaults; ValueError if bad.

    `raw` holds every keyword a sweep was sent besides folder and sizes: a name that is not
    an option is refused, so a typo in hand-written kwargs cannot pass unnoticed.
    """
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        accepted = ", ".join(("folder", "sizes", *OPTION_NAMES))
        raise ValueError(f"unknown argument(s) {names}; a sweep takes only {accepted}")
    options: dict[str, int] = {}
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


def is_junk(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in JUNK_PATTERNS)


def scan(folder: Path, settle_seconds: float, exclude: Iterable[Path] = ()) -> Scan:
    """List files under folder; only those unchanged for settle_seconds are ready."""
    result = Scan()
    excluded = {Path(path) for path in exclude}
    # ctime moves on every write and on every rename into the folder, and cannot be set
    # back by the writer (unlike mtime, which `cp -p` preserves): "unchanged since" uses it.
    settled_before = time.time_ns() - int(settle_seconds * 1e9)
    for entry in _walk(folder, excluded, result):
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if max(stat.st_ctime_ns, stat.st_mtime_ns) > settled_before:
            result.unstable += 1
            continue
        name = Path(entry.path).relative_to(folder).as_posix()
        if not _storable(entry.path, name):
            result.ignored += 1
            result.unstorable.append(os.fsencode(name).decode("utf-8", "backslashreplace"))
            continue
        result.ready.append(
            Candidate(
                path=Path(entry.path),
                name=name,
                size=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
            )
        )
    return result


def _storable(path: str, name: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(name) <= MAX_STORED_NAME and len(path) <= MAX_STORED_PATH


def _walk(folder: Path, excluded: set[Path], result: Scan) -> Iterator[os.DirEntry[str]]:
    stack = [folder]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            logger.warning("cannot list %s: %s", directory, exc)
            continue
        for entry in entries:
            if is_junk(entry.name):
                result.ignored += 1
            elif entry.is_dir(follow_symlinks=False):
                if entry.name in JUNK_DIRECTORIES or Path(entry.path) in excluded:
                    result.ignored += 1
                else:
                    stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                # Symlinks are claimed too, so that they fail with a reason ("not followed")
                # instead of sitting there unexplained.
                yield entry
            else:
                result.ignored += 1


def start_sweep(
    folder: str | None,
    sizes: Iterable[str] | str | None,
    *,
    trigger: str,
    schedule_name: str = "",
    task_id: str = "",
    options: Mapping[str, object] | None = None,
) -> tuple[Sweep, Path | None, list[str]]:
    """Record a sweep; if its arguments are bad the record says so and is already failed.

    `options` are the output options (see resolve_options); the resolved ones are kept on
    the sweep, and each image it claims gets them.
    """
    sweep = Sweep.objects.create(
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
    sweep.save(update_fields=["folder", "sizes", "options"])
    return sweep, path, labels


def run_sweep(
    sweep: Sweep,
    folder: Path,
    sizes: list[str],
    exclude: Iterable[Path] = (),
    requeue_after: float | None = None,
) -> SweepOutcome:
    """Repair what a crash left, then claim every ready file. Returns image ids to queue.

    Pending images queued more than `requeue_after` seconds ago (default REQUEUE_AFTER) are
    assumed to have lost their message and are queued again.
    """
    outcome = SweepOutcome(sweep)
    if not acquire_lock(sweep, folder):
        sweep.finish(Sweep.Status.SKIPPED)
        return outcome
    try:
        requeued = reconcile(folder, requeue_after)
        # Read before listing the folder: a file whose claim is released after this read
        # was moved away before it, so the listing cannot show it again.
        waiting = waiting_paths(folder)
        found = scan(folder, settings.SETTLE_SECONDS, exclude)
        claimed = claim(sweep, found.ready, sizes, waiting)
        sweep.seen = len(found.ready) + found.unstable
        sweep.unstable = found.unstable
        sweep.ignored = found.ignored
        sweep.claimed = len(claimed)
        sweep.requeued = len(requeued)
        sweep.finish(Sweep.Status.DONE, _unstorable_note(found.unstorable))
        outcome.to_queue = requeued + claimed
    except Exception as exc:
        # Recorded for the admin, then raised for Celery's result row and the logs.
        sweep.finish(Sweep.Status.FAILED, f"sweep stopped: {exc!r}")
        raise
    finally:
        release_lock(sweep, folder)
    return outcome


def _unstorable_note(names: list[str]) -> str:
    if not names:
        return ""
    shown = "; ".join(names[:20]) + (f"; and {len(names) - 20} more" if len(names) > 20 else "")
    return (
        f"{len(names)} file(s) left in place: their names are not valid UTF-8 or longer than "
        f"{MAX_STORED_NAME} characters, so they cannot be recorded; rename them: {shown}"
    )


def acquire_lock(sweep: Sweep, folder: Path) -> bool:
    now = timezone.now()
    expires_at = now + timedelta(seconds=settings.IMAGE_TIME_LIMIT) + LOCK_SLACK
    try:
        with transaction.atomic():
            SweepLock.objects.create(folder=str(folder), sweep=sweep, expires_at=expires_at)
        return True
    except IntegrityError:
        # Held: take it over only if its sweep died and left it to expire.
        taken = SweepLock.objects.filter(folder=str(folder), expires_at__lt=now).update(
            sweep=sweep, expires_at=expires_at
        )
        return taken == 1


def release_lock(sweep: Sweep, folder: Path) -> None:
    SweepLock.objects.filter(folder=str(folder), sweep=sweep).delete()


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
            folder=sweep.folder,
            name=candidate.name,
            source_path=str(candidate.path),
            file_size=candidate.size,
            mtime_ns=candidate.mtime_ns,
            sizes=sizes,
            sizes_key=Image.sizes_key_for(sizes, sweep.options),
            options=sweep.options,
            queued_at=now,
        )
        for candidate in ready
        if str(candidate.path) not in waiting
    ]
    # Another sweep (another beat, a manual sweep, a nested folder) may claim the same file
    # between our read and our insert: the partial unique index makes one insert win.
    Image.objects.bulk_create(rows, batch_size=CLAIM_BATCH, ignore_conflicts=True)
    return list(
        Image.objects.filter(sweep=sweep, status=Image.Status.PENDING)
        .order_by()
        .values_list("id", flat=True)
    )


def reconcile(folder: Path, requeue_after: float | None = None) -> list[int]:
    """Repair images waiting under folder that a crash or a lost message left behind.

    Returns the ids to queue again. Images already final but whose original was never
    moved are put away now; work on a dead worker is retried until MAX_ATTEMPTS.
    """
    prefix = str(folder).rstrip("/") + "/"
    return _repair(
        Image.objects.filter(in_folder=True, source_path__startswith=prefix), requeue_after
    )


def prune_idle_sweeps(older_than: timedelta) -> int:
    """Delete sweeps that found nothing to do, claimed nothing and recorded no error.

    A schedule sweeps every few seconds: kept forever, the idle ones would bury the rest.
    """
    deleted, _ = Sweep.objects.filter(
        started_at__lt=timezone.now() - older_than,
        status__in=(Sweep.Status.DONE, Sweep.Status.SKIPPED),
        claimed=0,
        requeued=0,
        error="",
    ).delete()
    return deleted


def recover_unswept(requeue_after: float | None = None) -> list[int]:
    """The same repair for images no sweep looks after: uploads and reprocessing.

    Their originals are read from MEDIA_ROOT (uploads/, or originals/ and failed/ when an
    image is processed again), a place no sweep lists.
    """
    prefix = str(settings.MEDIA_ROOT).rstrip("/") + "/"
    from_media = Image.objects.filter(source_path__startswith=prefix)
    waiting = _repair(from_media.filter(in_folder=True), requeue_after)
    again = _repair(
        from_media.filter(
            in_folder=False, status__in=(Image.Status.PENDING, Image.Status.PROCESSING)
        ),
        requeue_after,
    )
    return waiting + again


def _repair(waiting: QuerySet[Image], requeue_after: float | None) -> list[int]:
    now = timezone.now()
    requeue: list[int] = []
    # No ordering: the model's default (-queued_at) would make the database walk that index.
    waiting = waiting.order_by()
    for image in waiting.exclude(status=Image.Status.PENDING):
        try:
            if image.is_final:
                put_original_away(image)
            elif _is_abandoned(image, now):
                requeue.extend(_retry_or_fail(image))
        except OSError as exc:
            # One stuck original must not stop the sweep; it is tried again next time.
            logger.warning("cannot put away the original of image %s: %s", image.id, exc)
    if requeue_after is None:
        requeue_after = settings.REQUEUE_AFTER
    stale = now - timedelta(seconds=requeue_after)
    lost = list(
        waiting.filter(status=Image.Status.PENDING, queued_at__lt=stale).values_list(
            "id", flat=True
        )
    )
    if lost:
        # The message may be sitting in the queue still: a second copy is harmless, since
        # only one run can move the image from pending to processing.
        Image.objects.filter(id__in=lost, status=Image.Status.PENDING).update(queued_at=now)
        requeue.extend(lost)
    return requeue


def _is_abandoned(image: Image, now: datetime) -> bool:
    """Processing, but its worker is gone or it outlived the hard time limit."""
    limit = timedelta(seconds=settings.IMAGE_TIME_LIMIT) + timedelta(seconds=30)
    if image.started_at is None or image.started_at < now - limit:
        return True
    host, _, pid = image.worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _retry_or_fail(image: Image) -> list[int]:
    discard_partial_archives(image)
    if image.attempts >= settings.MAX_ATTEMPTS:
        reason = (
            f"processing stopped without a result {image.attempts} times (worker killed or "
            "crashed, or the time limit passed); giving up on this file"
        )
        with transaction.atomic():
            failed = Image.objects.filter(id=image.id, status=Image.Status.PROCESSING).update(
                status=Image.Status.FAILED, error=reason, finished_at=timezone.now()
            )
            if failed:
                outcomes.image_finished(image)
        if failed:
            image.status = Image.Status.FAILED
            image.error = reason
            put_original_away(image)
        return []
    logger.warning("image %s was abandoned by %s; queueing it again", image.id, image.worker)
    retried = Image.objects.filter(id=image.id, status=Image.Status.PROCESSING).update(
        status=Image.Status.PENDING, queued_at=timezone.now()
    )
    return [image.id] if retried else []


def work_is_stalled(window: timedelta, beat_running: bool) -> bool:
    """True when nothing started for `window` although work waits: a stuck worker.

    Sweeps count as work: a running beat sends one every interval, and a live worker
    records each one it runs.
    """
    since = timezone.now() - window
    if Sweep.objects.filter(started_at__gte=since).exists():
        return False
    if Image.objects.filter(started_at__gte=since).exists():
        return False
    return beat_running or (
        Image.objects.filter(status=Image.Status.PENDING, queued_at__lt=since).exists()
    )


# --- Where files go --------------------------------------------------------------------


def archive_path(image: Image) -> Path:
    """Where this run of an image writes its zip.

    Unique per image and the same on every try of its first run. An image that already has
    an archive (it is being reprocessed) gets a name of this run's own, so that the old zip
    stays whole and recorded until the new one is.
    """
    day = timezone.localtime(image.queued_at).strftime("%Y/%m/%d")
    name = f"{image.id}-{safe_stem(image.name)}"
    if image.archive and image.started_at:
        name += timezone.localtime(image.started_at).strftime("-%Y%m%d-%H%M%S-%f")
    return Path(settings.MEDIA_ROOT) / "archives" / day / f"{name}.zip"


def discard_partial_archives(image: Image) -> None:
    """Remove temporary zips a dead run of this image left (only it writes under this name)."""
    destination = archive_path(image)
    for partial in destination.parent.glob(f".{glob.escape(destination.name)}.*.part"):
        partial.unlink(missing_ok=True)
        logger.info("removed %s, left by a run that died", partial)


def kept_path(image: Image) -> Path:
    """Where the original goes once its image is final: processed or failed area."""
    area = "failed" if image.status == Image.Status.FAILED else "originals"
    day = timezone.localtime(image.queued_at).strftime("%Y/%m/%d")
    name = _truncate_name(Path(image.name).name)
    return Path(settings.MEDIA_ROOT) / area / day / f"{image.id}-{name}"


def put_original_away(image: Image) -> None:
    """Move a final image's original out of the watched folder and record where it went.

    Idempotent, and safe when a worker and a sweep's repair both get here: whoever renames
    second finds the original already at its destination.
    """
    source = Path(image.source_path)
    destination = kept_path(image)
    try:
        status = os.lstat(source)
    except FileNotFoundError:
        status = None
    if status is not None and (status.st_size, status.st_mtime_ns) != (
        image.file_size,
        image.mtime_ns,
    ):
        # Someone replaced the file after it was claimed: the new one is not this image's
        # (the next sweep claims it); this image's bytes are in its archive, if any.
        logger.warning("%s changed after image %s claimed it; leaving it", source, image.id)
        kept = ""
    else:
        if status is not None:
            destination.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                move_file(source, destination)
                if image.status == Image.Status.FAILED:
                    write_reason(destination, image)
        kept = str(destination) if os.path.lexists(destination) else ""
    Image.objects.filter(id=image.id).update(in_folder=False, original_path=kept)
    image.in_folder = False
    image.original_path = kept


def write_reason(kept: Path, image: Image) -> None:
    """A note beside a failed original saying why it failed."""
    reason_file = kept.with_name(kept.name + ".error.txt")
    try:
        reason_file.write_text(f"{image.name}\n{image.error}\n", encoding="utf-8")
    except OSError as exc:
        # The reason is in the database already; the note beside the file is a kindness.
        logger.warning("cannot write %s: %s", reason_file, exc)


def move_file(source: Path, destination: Path) -> None:
    """Rename, or copy-fsync-delete across file systems; the source goes only when safe."""
    try:
        os.rename(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # A name of its own: a worker and a sweep may both be finishing this image.
        fd, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
        os.close(fd)
        temporary = Path(name)
        os.unlink(temporary)  # copy2 will not copy a symlink over an existing file
        shutil.copy2(source, temporary, follow_symlinks=False)
        if not temporary.is_symlink():
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, destination)
        fsync_directory(destination.parent)
        source.unlink()
        return
    fsync_directory(destination.parent)


def _truncate_name(name: str) -> str:
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    suffix = Path(name).suffix[:16]
    stem = encoded[: MAX_NAME_BYTES - len(suffix.encode())].decode("utf-8", "ignore")
    return stem + suffix

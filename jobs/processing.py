"""One claimed image, start to finish: read, check, build the archive, record, put away.

Order of effects, so that a crash anywhere loses nothing: archive under a temporary name,
fsync, rename; then the database says done; only then does the original leave its folder.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists
from django.utils import timezone

from . import pipeline, storage
from .models import Image
from .sweep import archive_path, put_original_away, this_worker

logger = logging.getLogger(__name__)


def process_image(
    image_id: int,
    task_id: str = "",
    *,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> str:
    """Make the archive for one pending image. Returns the status it ended in.

    Safe to call twice for the same image (a redelivered message): only one call moves it
    from pending to processing; the others return "skipped" after finishing any leftover
    move of the original. `time_limit_errors` are what the caller's time limit raises
    inside the run; the image then fails with that reason.
    """
    worker = this_worker()
    if not Image.start(image_id, worker, task_id):
        image = Image.objects.filter(id=image_id).first()
        if image is not None and image.is_final and image.in_folder:
            put_original_away(image)
        return "skipped"
    image = Image.objects.get(id=image_id)
    try:
        return _process(image, worker)
    except time_limit_errors:
        return fail(
            image,
            f"took longer than the {settings.IMAGE_SOFT_TIME_LIMIT} s time limit per image",
            worker,
        )
    except pipeline.ImageRejected as exc:
        return fail(image, str(exc), worker)
    except OSError as exc:
        return fail(image, _describe_os_error(exc), worker)
    except MemoryError:
        # Failed below, once this block has let go of the traceback and the pixels it holds.
        pass
    except Exception as exc:
        # A bug, not bad input: keep the file safe and the reason visible, then let Celery
        # record the traceback too.
        fail(image, f"internal error: {exc!r}", worker)
        raise
    # A misjudged image stopped by the OS limit (jobs/worker.py): failed, not retried.
    return fail(
        image,
        f"ran out of this worker's {settings.WORKER_MEMORY_MB} MB memory budget "
        "(WORKER_MEMORY_MB) while making its thumbnails",
        worker,
    )


def fail(image: Image, reason: str, worker: str | None = None) -> str:
    """Record image as failed with reason and move its original to the failed area."""
    rows = Image.objects.filter(id=image.id, status=Image.Status.PROCESSING)
    if worker is not None:
        rows = rows.filter(worker=worker)
    if rows.update(status=Image.Status.FAILED, error=reason, finished_at=timezone.now()):
        logger.warning("image %s (%s) failed: %s", image.id, image.name, reason)
        image.status = Image.Status.FAILED
        image.error = reason
        put_original_away(image)
        return Image.Status.FAILED
    return "skipped"


def _process(image: Image, worker: str) -> str:
    try:
        data = read_original(Path(image.source_path), (image.file_size, image.mtime_ns))
    except FileChanged:
        return _release_changed(image, worker)
    sha256 = hashlib.sha256(data).hexdigest()
    Image.objects.filter(id=image.id).update(sha256=sha256)
    image.sha256 = sha256
    first = _first_done(image)
    if first is not None:
        recorded = _record_duplicate(image, first, worker)
        if recorded is not None:
            return recorded
    destination = archive_path(image)
    sizes = pipeline.parse_sizes(image.sizes)
    with storage.atomic_file(destination) as out:
        info = pipeline.write_archive(
            data,
            image.name,
            out,
            sizes,
            limits=pipeline.Limits(
                max_pixels=settings.MAX_IMAGE_PIXELS,
                max_bytes=settings.MAX_IMAGE_BYTES,
                memory_bytes=settings.WORKER_MEMORY_MB * pipeline.MiB,
            ),
            options=encode_options(image.options),
        )
    relative = destination.relative_to(settings.MEDIA_ROOT).as_posix()
    try:
        with transaction.atomic():
            done = Image.objects.filter(
                id=image.id, status=Image.Status.PROCESSING, worker=worker
            ).update(
                status=Image.Status.DONE,
                archive=relative,
                archive_size=info.archive_bytes,
                width=info.width,
                height=info.height,
                format=info.format,
                thumbnails={label: list(size) for label, size in info.thumbnails.items()},
                finished_at=timezone.now(),
            )
    except IntegrityError:
        # Same content with the same sizes finished first in another worker.
        destination.unlink(missing_ok=True)
        first = _first_done(image)
        recorded = _record_duplicate(image, first, worker) if first is not None else None
        if recorded is None:
            raise
        return recorded
    if not done:
        # Another run took this image over (we were presumed dead); its record stands.
        logger.warning("image %s was taken over by another run; leaving it", image.id)
        return "skipped"
    if image.archive and image.archive != relative:
        _retire_archive(image.archive)
    image.status = Image.Status.DONE
    put_original_away(image)
    return Image.Status.DONE


def encode_options(options: dict[str, object]) -> pipeline.EncodeOptions:
    """How to encode an image's thumbnails: its own options, else the settings."""
    quality = options.get("quality")
    if isinstance(quality, int) and not isinstance(quality, bool):
        return pipeline.EncodeOptions(jpeg_quality=quality, webp_quality=quality)
    return pipeline.EncodeOptions(jpeg_quality=settings.JPEG_QUALITY)


def _retire_archive(relative: str) -> None:
    """Delete a previous run's zip once the database no longer points to it."""
    old = Path(settings.MEDIA_ROOT) / relative
    transaction.on_commit(lambda: old.unlink(missing_ok=True))


def _release_changed(image: Image, worker: str) -> str:
    """The file changed after it was claimed: fail this claim, leave the file for a new one."""
    reason = (
        "the file changed after it was claimed (still being written?); it was left in place "
        "and is taken again, as a new image, once it stops changing"
    )
    rows = Image.objects.filter(id=image.id, status=Image.Status.PROCESSING, worker=worker)
    if rows.update(
        status=Image.Status.FAILED, error=reason, in_folder=False, finished_at=timezone.now()
    ):
        logger.warning("image %s (%s): %s", image.id, image.name, reason)
        return Image.Status.FAILED
    return "skipped"


class FileChanged(Exception):
    """The file is no longer the one that was claimed (its size or mtime moved)."""


def read_original(path: Path, claimed: tuple[int, int] | None = None) -> bytes:
    """Read a regular file without following symlinks, refusing paths outside our folders.

    With `claimed` (size, mtime_ns), raises FileChanged when the file is not that one.
    """
    if not is_allowed_source(path):
        raise pipeline.ImageRejected(f"{path} is outside the configured folders; not read")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise pipeline.ImageRejected(
                "symbolic link: links are not followed, so nothing outside the folder is read"
            ) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise pipeline.ImageRejected("not a regular file")
        if claimed is not None and (status.st_size, status.st_mtime_ns) != claimed:
            raise FileChanged(path)
        if status.st_size > settings.MAX_IMAGE_BYTES:
            raise pipeline.ImageRejected(
                f"file is {status.st_size:,} bytes, over the {settings.MAX_IMAGE_BYTES:,} limit"
            )
        return handle.read()


def is_allowed_source(path: Path) -> bool:
    """True when path lies in a watch root, the upload area, or where we keep originals.

    Kept originals (originals/, failed/) are written only by us; reading them again is how
    an image is reprocessed. The last part of the path is left unresolved.
    """
    if not path.is_absolute():
        return False
    parent = path.parent.resolve()
    media = Path(settings.MEDIA_ROOT)
    roots = [*settings.WATCH_ROOTS, media / "uploads", media / "originals", media / "failed"]
    return any(parent.is_relative_to(Path(root).resolve()) for root in roots)


def _first_done(image: Image) -> Image | None:
    return (
        Image.objects.filter(
            sha256=image.sha256, sizes_key=image.sizes_key, status=Image.Status.DONE
        )
        .exclude(id=image.id)
        .only("id")
        .first()
    )


def _record_duplicate(image: Image, first: Image, worker: str) -> str | None:
    """Record image as a duplicate of first; None if first stopped being done meanwhile."""
    # Only while `first` is still done: a reprocess may have just taken it back to pending.
    first_still_done = Exists(Image.objects.filter(id=first.id, status=Image.Status.DONE))
    updated = Image.objects.filter(
        first_still_done, id=image.id, status=Image.Status.PROCESSING, worker=worker
    ).update(
        status=Image.Status.DUPLICATE,
        duplicate_of=first,
        error="",
        archive="",
        archive_size=None,
        thumbnails={},
        finished_at=timezone.now(),
    )
    if not updated:
        still_ours = Image.objects.filter(
            id=image.id, status=Image.Status.PROCESSING, worker=worker
        ).exists()
        return None if still_ours else "skipped"
    if image.archive:
        # Reprocessed into sizes another image already has: its old zip is no longer its.
        _retire_archive(image.archive)
    image.status = Image.Status.DUPLICATE
    put_original_away(image)
    return Image.Status.DUPLICATE


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing the archive: {exc}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {exc}"
    if exc.errno == errno.ENOENT:
        return f"file vanished before it could be processed: {exc}"
    return f"could not read or write a file: {exc}"

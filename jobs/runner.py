"""One claimed image, start to finish: read, check, build the archive, record, put away.

Order of effects, so that a crash anywhere loses nothing: archive under a temporary name,
fsync, rename; then the database says done; only then does the original leave its folder.

A run owns its image by a token and a lease it renews from a thread while it works; every
state change it makes is conditional on the token, so a run presumed dead and taken over
(its lease ran out) records nothing over the run that replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, transaction

from . import leases, pipeline, storage
from .models import Image
from .sweeper import put_original_away, this_worker

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
    token = Image.objects.start(image_id, task_id, worker=this_worker())
    if token is None:
        image = Image.objects.filter(id=image_id).first()
        if image is not None and image.is_final and image.in_folder:
            _put_away(image)
        return "skipped"
    # Read after the start: its times and lease are the database's.
    image = Image.objects.get(id=image_id)
    image.token = token
    with keep_lease(image_id, token):
        try:
            return _process(image)
        except time_limit_errors:
            return fail(
                image,
                f"took longer than the {settings.IMAGE_SOFT_TIME_LIMIT} s time limit per image",
            )
        except pipeline.ImageRejected as exc:
            return fail(image, str(exc))
        except OSError as exc:
            return fail(image, _describe_os_error(exc))
        except MemoryError:
            # Failed below, once this block has let go of the traceback and the pixels it
            # holds.
            pass
        except (OperationalError, InterfaceError):
            # The database dropped the connection or stayed locked: nothing is wrong with
            # the file. Left to its lease, which runs out, and the next sweep retries it.
            raise
        except Exception as exc:
            # A bug, not bad input: keep the file safe and the reason visible, then let
            # Celery record the traceback too.
            fail(image, f"internal error: {exc!r}")
            raise
        # A misjudged image stopped by the OS limit (jobs/worker.py): failed, not retried.
        return fail(
            image,
            f"ran out of this worker's {settings.WORKER_MEMORY_MB} MB memory budget "
            "(WORKER_MEMORY_MB) while making its thumbnails",
        )


def keep_lease(image_id: int, token: uuid.UUID) -> contextlib.AbstractContextManager[None]:
    """Renew a run's lease (from the process's lease keeper) for as long as the body runs."""
    return leases.renewed(lambda: Image.objects.renew(image_id, token), f"image {image_id}")


def fail(image: Image, reason: str) -> str:
    """Record this run of image as failed with reason and move its original to the failed area."""
    if image.mark_failed(reason):
        logger.warning("image %s (%s) failed: %s", image.id, image.name, reason)
        _discard_unrecorded_zip(image)
        _put_away(image)
        return Image.Status.FAILED
    return "skipped"


def _process(image: Image) -> str:
    try:
        data = storage.read_original(
            Path(image.source_path),
            storage.FileIdentity.claimed(image),
            max_bytes=settings.MAX_IMAGE_BYTES,
        )
    except storage.FileChanged:
        return _release_changed(image)
    except storage.NotBeneath as exc:
        return _release_changed(image, f"{exc}; the file was left untouched, unread")
    # Recorded with the final state, whichever it is (models.Image.mark_done and the rest).
    image.sha256 = hashlib.sha256(data).hexdigest()
    first = _first_done(image)
    if first is not None:
        recorded = _record_duplicate(image, first)
        if recorded is not None:
            return recorded
    destination = storage.archive_path(image)
    sizes = pipeline.parse_sizes(image.sizes)
    # The partial zip is named after this run: a sweep that takes over a dead run deletes
    # that run's partial zip only, never the one of a run still writing.
    assert image.token is not None  # set when this run started
    with storage.atomic_file(destination, tag=image.token.hex) as out:
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
            libvips=settings.LIBVIPS_DECODE,
        )
    relative = destination.relative_to(settings.MEDIA_ROOT).as_posix()
    previous = image.archive
    try:
        done = image.mark_done(
            archive=relative,
            archive_size=info.archive_bytes,
            width=info.width,
            height=info.height,
            format=info.format,
            thumbnails={label: list(size) for label, size in info.thumbnails.items()},
            notes="; ".join(info.notes),
        )
    except IntegrityError:
        # Same content with the same sizes finished first in another worker. The zip goes,
        # unless a run that took this image over may be writing that name now.
        if image.is_current_run():
            storage.remove_archive(relative)
        first = _first_done(image)
        recorded = _record_duplicate(image, first) if first is not None else None
        if recorded is None:
            raise
        return recorded
    if not done:
        # Another run took this image over (we were presumed dead); its record stands.
        logger.warning("image %s was taken over by another run; leaving it", image.id)
        return "skipped"
    if previous and previous != relative:
        _retire_archive(previous)
    _put_away(image)
    return Image.Status.DONE


def encode_options(options: dict[str, object]) -> pipeline.EncodeOptions:
    """How to make an image's thumbnails: its own options (the preset its sweep resolved,
    see sweeper.resolve_options), else the pipeline's defaults and JPEG_QUALITY."""
    preset: dict[str, Any] = {
        name: options[name]
        for name in ("format", "fit", "gravity", "metadata", "colour")
        if isinstance(options.get(name), str)
    }
    preset["gps"] = options.get("gps") is True
    quality = options.get("quality")
    if isinstance(quality, int) and not isinstance(quality, bool):
        return pipeline.EncodeOptions(
            jpeg_quality=quality, webp_quality=quality, avif_quality=quality, **preset
        )
    return pipeline.EncodeOptions(jpeg_quality=settings.JPEG_QUALITY, **preset)


def _retire_archive(relative: str) -> None:
    """Delete a previous run's zip once the database no longer points to it."""
    transaction.on_commit(lambda: storage.remove_archive(relative))


def _discard_unrecorded_zip(image: Image) -> None:
    """Remove the zip of this run's name, now that its image is final without one.

    A run that died after renaming its zip into place leaves it for the run that retries
    the image, which writes the same name (storage.discard_dead_run_archives). A retry
    that ends failed or duplicate writes nothing: no record names that zip, and no later
    run of the image replaces it. A reprocess (an archive recorded) names its zip after its
    own start, so a dead run's was removed when the image was retried.
    """
    if not image.archive:
        relative = storage.archive_path(image).relative_to(settings.MEDIA_ROOT).as_posix()
        storage.remove_archive(relative)


CHANGED = (
    "the file changed after it was claimed (still being written?); it was left in place "
    "and is taken again, as a new image, once it stops changing"
)


def _release_changed(image: Image, reason: str = CHANGED) -> str:
    """What is at the claimed path is not the claimed file, or is reached through a link
    now: fail this claim and leave the file untouched (a new file is claimed anew)."""
    if image.release_changed(reason):
        logger.warning("image %s (%s): %s", image.id, image.name, reason)
        _discard_unrecorded_zip(image)
        return Image.Status.FAILED
    return "skipped"


def _first_done(image: Image) -> Image | None:
    # An image whose zip retention deleted is no first: the same content gets a new zip.
    return (
        Image.objects.filter(
            sha256=image.sha256, sizes_key=image.sizes_key, status=Image.Status.DONE
        )
        .exclude(id=image.id)
        .exclude(archive="")
        .only("id")
        .first()
    )


def _record_duplicate(image: Image, first: Image) -> str | None:
    """Record image as a duplicate of first; None if first stopped being done meanwhile."""
    previous = image.archive
    if not image.mark_duplicate(first):
        return None if image.is_current_run() else "skipped"
    if previous:
        # Reprocessed into sizes another image already has: its old zip is no longer its.
        _retire_archive(previous)
    else:
        _discard_unrecorded_zip(image)
    _put_away(image)
    return Image.Status.DUPLICATE


def _put_away(image: Image) -> None:
    """Move a final image's original out of its folder, if the folder lets it: a folder
    that refuses (read-only, say) changes nothing of the image's outcome. The original then
    stays, still recorded as in the folder, and every sweep tries the move again."""
    try:
        put_original_away(image)
    except OSError as exc:
        logger.warning(
            "image %s (%s) is %s, but its original stays in the folder until it can be moved: %s",
            image.id,
            image.name,
            image.status,
            exc,
        )


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing the archive: {exc}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {exc}"
    if exc.errno == errno.ENOENT:
        return f"file vanished before it could be processed: {exc}"
    return f"could not read or write a file: {exc}"

"""Work that comes from people rather than from a folder scan: uploads and reprocessing.

Both end in the same records and the same pipeline as a watched-folder drop. An upload is
saved under MEDIA_ROOT/uploads and claimed like a file a sweep found. A reprocess puts a
finished image back to pending, to be read again from where its original is kept; its old
archive stays recorded until the new run records its own (the new zip replaces it by rename).
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .models import Image, Sweep
from .pipeline import fsync_directory, safe_stem

_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


class UploadedFile(Protocol):
    name: str

    def chunks(self) -> Iterable[bytes]: ...


@dataclass
class Reclaim:
    """What a reprocess request did: ids to queue, and images left alone with the reason."""

    queued: list[int] = field(default_factory=list)
    skipped: list[tuple[Image, str]] = field(default_factory=list)


def upload_area() -> Path:
    return Path(settings.MEDIA_ROOT) / "uploads"


def kept_areas() -> tuple[Path, Path]:
    media = Path(settings.MEDIA_ROOT)
    return media / "originals", media / "failed"


def upload_name(name: str, taken: set[str]) -> str:
    """A safe file name for an uploaded file, unique among `taken` (which it joins)."""
    suffix = Path(name).suffix
    suffix = suffix.lower() if _SUFFIX.match(suffix) else ""
    stem = safe_stem(name)
    candidate = stem + suffix
    number = 2
    while candidate in taken:
        candidate = f"{stem} ({number}){suffix}"
        number += 1
    taken.add(candidate)
    return candidate


def save_upload(upload: UploadedFile, destination: Path) -> None:
    """Write an uploaded file under a temporary name, fsync, then rename into place."""
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in upload.chunks():
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def claim_uploads(
    uploads: Sequence[UploadedFile], sizes: list[str], user: AbstractBaseUser
) -> tuple[Sweep, list[int]]:
    """Save uploaded files and claim them in one upload sweep. Returns it and the image ids.

    Call inside a transaction and queue the ids once it commits.
    """
    day = timezone.localtime().strftime("%Y/%m/%d")
    folder = upload_area() / day / uuid.uuid4().hex
    folder.mkdir(parents=True)
    saved: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for upload in uploads:
        name = upload_name(upload.name, taken)
        path = folder / name
        save_upload(upload, path)
        saved.append((name, path))
    fsync_directory(folder)
    sweep = Sweep.objects.create(
        trigger=Sweep.Trigger.UPLOAD, folder=str(folder), sizes=sizes, requested_by=user
    )
    now = timezone.now()
    ids = []
    for name, path in saved:
        status = path.stat()
        image = Image.objects.create(
            sweep=sweep,
            source=Image.Source.UPLOAD,
            uploaded_by=user,
            folder=str(folder),
            name=name,
            source_path=str(path),
            file_size=status.st_size,
            mtime_ns=status.st_mtime_ns,
            sizes=sizes,
            sizes_key=Image.sizes_key_for(sizes),
            queued_at=now,
        )
        ids.append(image.id)
    sweep.seen = sweep.claimed = len(ids)
    sweep.finish(Sweep.Status.DONE)
    return sweep, ids


def why_not_reprocess(image: Image) -> str:
    """Why an image cannot be processed again right now; empty when it can."""
    if not image.is_final:
        return "it is still being processed"
    if image.in_folder or not image.original_path:
        return "its original has not been put away yet (the next sweep of its folder does it)"
    original = Path(image.original_path)
    if not any(original.parent.resolve().is_relative_to(area.resolve()) for area in kept_areas()):
        return f"its original {original} is not in MEDIA_ROOT's originals or failed area"
    if not original.is_file() or original.is_symlink():
        return f"its original is missing from {original}"
    return ""


def claim_again(images: Iterable[Image], sizes: list[str] | None = None) -> Reclaim:
    """Put finished images back to pending, read from their kept original, with new sizes.

    Each image is claimed by one conditional update, so two people pressing the button at
    once queue it once. The old archive stays where it is until the new one is recorded.
    """
    result = Reclaim()
    for image in images:
        reason = why_not_reprocess(image)
        if reason:
            result.skipped.append((image, reason))
            continue
        labels = list(sizes or image.sizes)
        with transaction.atomic():
            claimed = Image.objects.filter(
                id=image.id,
                status=image.status,
                in_folder=False,
                original_path=image.original_path,
            ).update(
                status=Image.Status.PENDING,
                source_path=F("original_path"),
                sizes=labels,
                sizes_key=Image.sizes_key_for(labels),
                error="",
                duplicate_of=None,
                attempts=0,
                worker="",
                task_id="",
                started_at=None,
                finished_at=None,
            )
        if not claimed:
            result.skipped.append((image, "someone else changed it at the same moment"))
            continue
        if image.status == Image.Status.FAILED:
            # The note beside a failed original describes the old failure; a new one is
            # written if this run fails too.
            Path(image.original_path + ".error.txt").unlink(missing_ok=True)
        result.queued.append(image.id)
    return result


def lost_uploads(images: Iterable[Image]) -> list[int]:
    """Pending uploads whose queue message seems lost, claimed for queueing again.

    Sweeps repair images waiting in the folders they sweep; the upload area is never swept,
    so whoever watches an upload (its status page) nudges it instead. The conditional
    update lets exactly one watcher requeue each.
    """
    stale = timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER)
    ids = []
    for image in images:
        if image.status != Image.Status.PENDING or image.queued_at >= stale:
            continue
        if not image.in_folder or image.source != Image.Source.UPLOAD:
            continue
        if Image.objects.filter(
            id=image.id, status=Image.Status.PENDING, queued_at=image.queued_at
        ).update(queued_at=timezone.now()):
            ids.append(image.id)
    return ids

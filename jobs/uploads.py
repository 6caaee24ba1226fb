"""Work that comes from people rather than from a folder scan: uploads and reprocessing.

Both end in the same records and the same pipeline as a watched-folder drop. An upload is
saved under MEDIA_ROOT/uploads first, then claimed like a file a sweep found in one short
transaction. A reprocess puts a finished image back to pending, to be read again from where
its original is kept. Its old archive is kept and stays recorded until the new run records
its own; the new run writes a new archive name, and the old file is deleted only once the
database records the new one. If the new run fails, the old archive stays.

Neither may take a zip away from duplicates that use it (see `duplicates_using`).
"""

from __future__ import annotations

import logging
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.utils import timezone

from . import storage
from .models import Image, Sweep
from .pipeline import safe_stem
from .storage import SavedUploads
from .sweeper import resolve_options

logger = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


class UploadedFile(Protocol):
    name: str

    def chunks(self) -> Iterable[bytes]: ...


@dataclass
class Reclaim:
    """What a reprocess request did: ids to queue, and images left alone with the reason."""

    queued: list[int] = field(default_factory=list)
    skipped: list[tuple[Image, str]] = field(default_factory=list)


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


def save_uploads(uploads: Sequence[UploadedFile]) -> SavedUploads:
    """Write uploaded files, under safe names, into a new folder of the upload area; all
    of them or none.

    Call outside any transaction: writing and fsyncing big files must not hold the
    database's write lock.
    """
    taken: set[str] = set()
    return storage.save_uploads([(upload_name(upload.name, taken), upload) for upload in uploads])


def discard_uploads(saved: SavedUploads) -> None:
    """Remove saved uploads that were never claimed, and their folder."""
    storage.discard_uploads(saved)


def claim_uploads(
    saved: SavedUploads,
    sizes: list[str],
    user: User,
    options: dict[str, object] | None = None,
) -> tuple[Sweep, list[int]]:
    """Claim saved uploads in one upload sweep. Returns it and the image ids.

    `options` is the output preset asked for; what it leaves out takes the settings'.

    Call inside a transaction, queue the ids once it commits, and discard the files if it
    rolls back.
    """
    resolved = resolve_options(options)
    sweep = Sweep.objects.create(
        trigger=Sweep.Trigger.UPLOAD,
        folder=str(saved.folder),
        sizes=sizes,
        requested_by=user,
        options=resolved,
    )
    now = timezone.now()
    ids = []
    for saved_file in saved.files:
        image = Image.objects.create(
            sweep=sweep,
            source=Image.Source.UPLOAD,
            uploaded_by=user,
            folder=str(saved.folder),
            name=saved_file.name,
            source_path=str(saved_file.path),
            file_size=saved_file.identity.size,
            mtime_ns=saved_file.identity.mtime_ns,
            device=saved_file.identity.device,
            inode=saved_file.identity.inode,
            sizes=sizes,
            sizes_key=Image.sizes_key_for(sizes, resolved),
            options=resolved,
            queued_at=now,
        )
        ids.append(image.id)
    sweep.seen = sweep.claimed = len(ids)
    sweep.finish(Sweep.Status.DONE)
    return sweep, ids


def duplicates_using(images: QuerySet[Image]) -> Counter[int]:
    """How many duplicates outside `images` get their zip from each done image of `images`.

    Reprocessing or deleting such an image would take their zip away.
    """
    selected = images.values("id")
    return Counter(
        Image.objects.filter(
            duplicate_of__in=images.filter(status=Image.Status.DONE).values("id"),
            status=Image.Status.DUPLICATE,
        )
        .exclude(id__in=selected)
        .values_list("duplicate_of_id", flat=True)
    )


def duplicates_reason(count: int) -> str:
    return f"its zip is also the zip of {count} duplicate image(s), which would lose it"


def why_not_reprocess(image: Image) -> str:
    """Why an image cannot be processed again right now; empty when it can."""
    if not image.is_final:
        return "it is still being processed"
    if image.in_folder:
        return "its original has not been put away yet (the next sweep of its folder does it)"
    if not image.original_path:
        # Retention deleted it (KEEP_ORIGINALS_DAYS), or it was left where it was found
        # (its error says why): no sweep will bring it back.
        return "its original is no longer kept (see its error, and KEEP_ORIGINALS_DAYS)"
    original = Path(image.original_path)
    try:
        kept = storage.kept_original(original)
    except storage.NotBeneath:
        return f"its original {original} is not in MEDIA_ROOT's originals or failed area"
    except OSError:
        kept = None
    if kept is None or not stat.S_ISREG(kept.st_mode):
        return f"its original is missing from {original}"
    dependents = duplicates_using(Image.objects.filter(id=image.id))[image.id]
    if dependents:
        return (
            duplicates_reason(dependents)
            + "; delete those, or reprocess them with other sizes, first"
        )
    return ""


def claim_again(
    images: Iterable[Image],
    sizes: list[str] | None = None,
    options: dict[str, object] | None = None,
) -> Reclaim:
    """Put finished images back to pending, read from their kept original, with new sizes.

    Each image is claimed by one conditional update, so two people pressing the button at
    once queue it once. The old archive stays recorded until the new run records its own.
    Each keeps its output options (quality, preset) unless `options` gives new ones.
    """
    result = Reclaim()
    for image in images:
        reason = why_not_reprocess(image)
        if reason:
            result.skipped.append((image, reason))
            continue
        labels = list(sizes or image.sizes)
        # The kept original as it is now: a failed one may have been replaced by a fixed file.
        try:
            kept = storage.FileIdentity.of(storage.kept_original(Path(image.original_path)))
        except OSError as exc:
            result.skipped.append((image, f"its original cannot be read: {exc.strerror}"))
            continue
        except storage.NotBeneath as exc:
            result.skipped.append((image, f"its original cannot be read: {exc}"))
            continue
        was_failed = image.status == Image.Status.FAILED
        resolved = None
        if options is not None:
            # A new preset; each image keeps the quality it was made with.
            kept_quality = (
                {"quality": image.options["quality"]} if "quality" in image.options else {}
            )
            resolved = resolve_options({**kept_quality, **options})
        if not image.reclaim(labels, kept, resolved):
            result.skipped.append((image, "someone else changed it at the same moment"))
            continue
        if was_failed:
            # The note beside a failed original describes the old failure; a new one is
            # written if this run fails too.
            storage.remove_note(Path(image.original_path))
        result.queued.append(image.id)
    return result

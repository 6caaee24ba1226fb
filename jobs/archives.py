"""Which zip serves an image, and what that zip holds: read by the views and the admin alike.

A duplicate has no zip of its own; a reprocessed image keeps its earlier one until the new
one is made. Which record's zip answers for an image is a rule over the records, not a
file-system effect, so it lives here rather than in `storage` (which owns every path and
descriptor and stays free of the models' states); this module opens a zip only through
`storage.open_archive` and reads nothing but its member list.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence

from . import storage
from .models import Image
from .pipeline import EXTENSIONS

logger = logging.getLogger(__name__)


def archive_holder(image: Image) -> Image | None:
    """The image whose archive holds this image's zip: itself, or the first of a duplicate.

    An image being reprocessed, or whose reprocess failed, still has its earlier archive. A
    duplicate whose first's zip retention deleted has none: the first is done without one.
    """
    if image.status == Image.Status.DUPLICATE:
        first = image.duplicate_of
        if (
            first
            and first.status == Image.Status.DONE
            and first.archive
            and first.sizes_key == image.sizes_key
        ):
            return first
        return None
    return image if image.archive else None


def thumbnail_member(names: list[str], label: str, size: Sequence[int]) -> str | None:
    """The zip member holding the thumbnail of box `label` made at `size`, [w, h] (never
    the original).

    Members are named after the size they are, whatever box they were made for; an image's
    `thumbnails` says which size each box came to. Zips made before that (releases before
    output presets) named them after the box, and stay on disk through an upgrade."""
    width, height = size
    for named in (f"{width}x{height}", label):
        endings = tuple(f"_{named}{extension}" for extension in set(EXTENSIONS.values()))
        member = next((name for name in names[1:] if name.endswith(endings)), None)
        if member is not None:
            return member
    return None


def sorted_thumbnails(thumbnails: dict[str, list[int]]) -> list[tuple[str, int, int]]:
    """(label, width, height) from the smallest to the largest."""
    rows = [(label, size[0], size[1]) for label, size in thumbnails.items()]
    return sorted(rows, key=lambda row: (row[1] * row[2], row[0]))


def zip_listing(image: Image) -> list[tuple[str, int]] | None:
    """(member name, bytes) of an image's zip, or None when there is none."""
    holder = archive_holder(image)
    if holder is None:
        return None
    handle = storage.open_archive(holder.archive)
    if handle is None:
        return None
    try:
        with handle, zipfile.ZipFile(handle) as archive:
            return [(info.filename, info.file_size) for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError) as exc:
        logger.warning("cannot read %s: %s", holder.archive, exc)
        return None

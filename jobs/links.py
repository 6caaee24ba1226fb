"""Addresses of an image's files and of a sweep's images, built one way for every page.

The JSON views, the upload page and the admin all link to the same thumbnails and lists;
the URL names they reverse belong to `jobs/urls.py` and the admin, but the rules (which
thumbnail makes a preview, the version that lets a browser cache a file) are written once
here, so that the admin needs nothing from `views`.
"""

from __future__ import annotations

from django.urls import reverse

from .archives import archive_holder, sorted_thumbnails
from .models import Image

# The smallest edge a preview may have and still show something.
PREVIEW_EDGE = 48


def version(image: Image) -> str:
    """Changes whenever the image's zip does: a file URL carrying it may be cached."""
    stamp = image.finished_at.timestamp() if image.finished_at else 0
    return f"{image.archive_size or 0}-{stamp:.0f}"


def thumbnail_url(image: Image, label: str) -> str:
    return reverse("jobs:thumbnail", args=[image.id, label]) + f"?v={version(image)}"


def preview_url(image: Image) -> str | None:
    """The smallest thumbnail that still makes a visible preview (or the largest there is)."""
    holder = archive_holder(image)
    if holder is None or not holder.thumbnails:
        return None
    made = sorted_thumbnails(holder.thumbnails)
    big_enough = [row for row in made if max(row[1], row[2]) >= PREVIEW_EDGE]
    label = (big_enough[0] if big_enough else made[-1])[0]
    return reverse("jobs:thumbnail", args=[image.id, label]) + f"?v={version(holder)}"


def sweep_images_url(sweep_id: int) -> str:
    """The admin's list of the images one sweep claimed."""
    return reverse("admin:jobs_image_changelist") + f"?sweep__id__exact={sweep_id}"

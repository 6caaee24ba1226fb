"""`manage.py jobs`: the image table, for people and for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from jobs.models import Image


def non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = "List images and what became of them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--status", choices=Image.Status.values, help="Only this status.")
        parser.add_argument("--json", action="store_true", help="Print a JSON array.")
        parser.add_argument(
            "--limit", type=non_negative, default=0, help="At most this many, newest (0: all)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        images = Image.objects.order_by("-queued_at", "-id")
        if options["status"]:
            images = images.filter(status=options["status"])
        if options["limit"]:
            images = images[: options["limit"]]
        rows = [as_row(image) for image in images.iterator()]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        if not rows:
            self.stdout.write("no images")
            return
        self.stdout.write(f"{'id':>6}  {'status':<10} {'pixels':>11}  {'name':<40} archive / error")
        for row in rows:
            pixels = f"{row['width']}x{row['height']}" if row["width"] else ""
            detail = row["archive"] or row["error"] or ""
            self.stdout.write(
                f"{row['id']:>6}  {row['status']:<10} {pixels:>11}  {row['name']:<40} {detail}"
            )


def as_row(image: Image) -> dict[str, Any]:
    archive = Path(settings.MEDIA_ROOT) / image.archive if image.archive else None
    return {
        "id": image.id,
        "name": image.name,
        "folder": image.folder,
        "status": image.status,
        "archive": str(archive) if archive else None,
        "archive_size": image.archive_size,
        "original": image.original_path or (image.source_path if image.in_folder else None),
        "error": image.error or None,
        "sha256": image.sha256 or None,
        "width": image.width,
        "height": image.height,
        "format": image.format or None,
        "sizes": image.sizes,
        "duplicate_of": image.duplicate_of_id,
        "source": image.source,
        "sweep": image.sweep_id,
        "queued_at": image.queued_at.isoformat(),
        "finished_at": image.finished_at.isoformat() if image.finished_at else None,
    }

"""Presentation only: staff-gated file downloads."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import FileResponse, Http404, HttpRequest
from django.shortcuts import get_object_or_404

from .models import Image


@staff_member_required
def download_archive(request: HttpRequest, image_id: int) -> FileResponse:
    """The zip of one image; MEDIA_ROOT is never served publicly."""
    image = get_object_or_404(Image, id=image_id, status=Image.Status.DONE)
    media_root = Path(settings.MEDIA_ROOT).resolve()
    path = (media_root / image.archive).resolve()
    if not image.archive or not path.is_relative_to(media_root) or not path.is_file():
        raise Http404("archive not found")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name)

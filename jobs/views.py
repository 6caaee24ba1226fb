"""Presentation and dispatch: the upload page, JSON status, and files served from the zips.

Nothing under MEDIA_ROOT is public. A signed-in person sees the images they uploaded;
staff with the view permission see every image (and every sweep, with the sweeps' one).
Anything else is a 404, so ids of other people's images tell nothing.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AnonymousUser, User
from django.db import transaction
from django.db.models import QuerySet
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
)
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST, require_safe
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import health, metrics, storage, uploads
from .archives import archive_holder, sorted_thumbnails, thumbnail_member
from .forms import UploadForm, default_sizes
from .links import preview_url, sweep_images_url, thumbnail_url
from .models import Image, Sweep
from .pipeline import EXTENSIONS, safe_stem
from .tasks import queue_images
from .upload_limits import accepts_uploads, upload_handler_of, upload_refused

logger = logging.getLogger(__name__)

LOGIN_URL = "jobs:login"
RECENT_UPLOADS = 30
# Finished files do not change under a URL that carries their version; cache them privately.
FILE_CACHE = "private, max-age=86400"
ZIP_CACHE = "private, no-cache"
COPY_CHUNK = 1024 * 1024


# --- Who sees what ----------------------------------------------------------------------


def sees_everything(user: User | AnonymousUser) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm("jobs.view_image"))


def visible_images(user: User | AnonymousUser) -> QuerySet[Image]:
    if sees_everything(user):
        return Image.objects.all()
    if not user.is_authenticated:
        return Image.objects.none()
    return Image.objects.filter(uploaded_by=user)


def sees_every_sweep(user: User | AnonymousUser) -> bool:
    # A sweep's record (its folder, schedule and error) is what the admin's sweep pages
    # show: the same permission, not the images'.
    return bool(user.is_active and user.is_staff and user.has_perm("jobs.view_sweep"))


def visible_sweeps(user: User | AnonymousUser) -> QuerySet[Sweep]:
    if sees_every_sweep(user):
        return Sweep.objects.all()
    if not user.is_authenticated:
        return Sweep.objects.none()
    return Sweep.objects.filter(trigger=Sweep.Trigger.UPLOAD, requested_by=user)


def api_login_required(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """Like login_required, but a script gets a 401 in JSON rather than a login page."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        return view(request, *args, **kwargs)

    return wrapper


# --- Files from an image's zip -----------------------------------------------------------


def visible_archive(request: HttpRequest, image_id: int) -> tuple[Image, Image, BinaryIO]:
    """An image this user may see, the image whose zip it uses, and that zip opened; else
    404. The caller closes the zip."""
    image = get_object_or_404(
        visible_images(request.user).select_related("duplicate_of"), id=image_id
    )
    holder = archive_holder(image)
    archive = storage.open_archive(holder.archive) if holder else None
    if holder is None or archive is None:
        raise Http404("archive not found")
    return image, holder, archive


@login_required(login_url=LOGIN_URL)
@require_GET
def download_archive(request: HttpRequest, image_id: int) -> HttpResponseBase:
    """The zip of one image. For a duplicate, the first one's zip under this image's name."""
    image, holder, archive = visible_archive(request, image_id)
    filename = f"{image.id}-{safe_stem(image.name)}.zip"
    if holder.id == image.id:
        response = FileResponse(archive, as_attachment=True, filename=filename)
    else:
        with archive:
            renamed = renamed_zip(archive, safe_stem(holder.name), safe_stem(image.name))
        response = FileResponse(renamed, as_attachment=True, filename=filename)
    # One person's file, under an address that a reprocess gives another zip: no shared
    # cache may keep it, and a browser asks again.
    response["Cache-Control"] = ZIP_CACHE
    return response


def renamed_zip(archive: BinaryIO, old_stem: str, new_stem: str) -> Any:
    """A copy of a zip whose members are named after another image (for duplicates).

    The first upload of some content may be another person's: its name stays theirs.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)  # noqa: SIM115
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            name = info.filename
            if name.startswith(old_stem):
                name = new_stem + name[len(old_stem) :]
            copy = zipfile.ZipInfo(name, info.date_time)
            copy.external_attr = info.external_attr
            copy.file_size = info.file_size  # tells zipfile whether the member needs ZIP64
            # Member by member, a chunk at a time: an original may be UPLOAD_MAX_BYTES.
            with source.open(info) as member, out.open(copy, "w") as target:
                shutil.copyfileobj(member, target, COPY_CHUNK)
    spool.seek(0)
    return spool


# Every suffix the pipeline writes a thumbnail under. Not `mimetypes`: without the host's
# /etc/mime.types, Python 3.11 knows neither WebP nor AVIF.
THUMBNAIL_TYPES = {suffix: f"image/{name.lower()}" for name, suffix in EXTENSIONS.items()}


@login_required(login_url=LOGIN_URL)
@require_GET
def thumbnail(request: HttpRequest, image_id: int, label: str) -> HttpResponse:
    """One thumbnail, read from the image's zip."""
    _, holder, handle = visible_archive(request, image_id)
    try:
        with handle, zipfile.ZipFile(handle) as archive:
            size = holder.thumbnails.get(label)
            member = thumbnail_member(archive.namelist(), label, size) if size else None
            if member is None:
                raise Http404("no thumbnail of that size")
            data = archive.read(member)
    except (zipfile.BadZipFile, OSError) as exc:
        logger.warning("cannot read %s: %s", holder.archive, exc)
        raise Http404("archive unreadable") from None
    response = HttpResponse(data, content_type=THUMBNAIL_TYPES[Path(member).suffix.lower()])
    response["Cache-Control"] = FILE_CACHE
    return response


# --- JSON ---------------------------------------------------------------------------------


PROGRESS: dict[str, int] = {
    Image.Status.PENDING: 0,
    Image.Status.PROCESSING: 50,
    Image.Status.DONE: 100,
    Image.Status.FAILED: 100,
    Image.Status.DUPLICATE: 100,
}


def iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def without_server_paths(text: str, folders: list[str]) -> str:
    """Error text for people who are not staff, without absolute server paths.

    A path under MEDIA_ROOT or one of `folders` is cut to its last part (the file name).
    """
    media = Path(settings.MEDIA_ROOT)
    roots = {str(media), str(media.resolve()), *folders}
    for root in sorted((r.rstrip("/") for r in roots if r.strip("/")), key=len, reverse=True):
        # The root, then the rest of the path up to a space or a quote; not a longer name
        # that merely starts like the root (/srv/media2, /srv/media.old).
        pattern = re.escape(root) + r"(/[^\s'\"]*)?(?![\w-]|\.\w)"
        text = re.sub(pattern, lambda match: Path(match.group(0)).name or "…", text)
    return text


def image_data(image: Image, staff: bool) -> dict[str, Any]:
    holder = archive_holder(image)
    thumbnails = sorted_thumbnails(holder.thumbnails) if holder else []
    data: dict[str, Any] = {
        "id": image.id,
        "name": image.name,
        "source": image.source,
        "status": image.status,
        "status_label": image.get_status_display(),
        "final": image.is_final,
        "progress": PROGRESS.get(image.status, 0),
        "sizes": image.sizes,
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "file_size": image.file_size,
        "archive_size": holder.archive_size if holder else None,
        "archive_url": reverse("jobs:archive", args=[image.id]) if holder else None,
        "preview_url": preview_url(image),
        "thumbnails": [
            {"size": label, "width": width, "height": height, "url": thumbnail_url(image, label)}
            for label, width, height in thumbnails
        ],
        "is_duplicate": image.status == Image.Status.DUPLICATE,
        "error": image.error if staff else without_server_paths(image.error, [image.folder]),
        "queued_at": iso(image.queued_at),
        "started_at": iso(image.started_at),
        "finished_at": iso(image.finished_at),
        "seconds": image.duration.total_seconds() if image.duration else None,
        "status_url": reverse("jobs:image-status", args=[image.id]),
    }
    if staff:
        data["admin_url"] = reverse("admin:jobs_image_change", args=[image.id])
        data["duplicate_of"] = image.duplicate_of_id
        data["folder"] = image.folder
        data["attempts"] = image.attempts
    return data


def sweep_data(sweep: Sweep, images: list[Image], staff: bool) -> dict[str, Any]:
    counts = dict.fromkeys(Image.Status.values, 0)
    for image in images:
        counts[image.status] += 1
    finished = sum(counts[status] for status in Image.FINAL_STATUSES)
    over = sweep.status != Sweep.Status.RUNNING and finished == len(images)
    data: dict[str, Any] = {
        "id": sweep.id,
        "status": sweep.status,
        "status_label": sweep.get_status_display(),
        "trigger": sweep.trigger,
        "sizes": sweep.sizes,
        "started_at": iso(sweep.started_at),
        "finished_at": iso(sweep.finished_at),
        "seen": sweep.seen,
        "claimed": sweep.claimed,
        "unstable": sweep.unstable,
        "ignored": sweep.ignored,
        "requeued": sweep.requeued,
        "error": sweep.error if staff else without_server_paths(sweep.error, [sweep.folder]),
        "counts": counts,
        "total": len(images),
        "finished": finished,
        "progress": round(100 * finished / len(images)) if images else (100 if over else 0),
        "over": over,
        "images": [image_data(image, staff) for image in images],
    }
    if staff:
        data["folder"] = sweep.folder
        data["schedule_name"] = sweep.schedule_name
        data["admin_url"] = reverse("admin:jobs_sweep_change", args=[sweep.id])
        data["images_admin_url"] = sweep_images_url(sweep.id)
    return data


@api_login_required
@require_GET
def image_status(request: HttpRequest, image_id: int) -> JsonResponse:
    image = get_object_or_404(
        visible_images(request.user).select_related("duplicate_of"), id=image_id
    )
    return JsonResponse(image_data(image, sees_everything(request.user)))


@api_login_required
@require_GET
def sweep_status(request: HttpRequest, sweep_id: int) -> JsonResponse:
    sweep = get_object_or_404(visible_sweeps(request.user), id=sweep_id)
    images = list(
        visible_images(request.user)
        .filter(sweep=sweep)
        .select_related("duplicate_of")
        .order_by("id")
    )
    return JsonResponse(sweep_data(sweep, images, sees_everything(request.user)))


@api_login_required
@require_GET
def sweep_by_task(request: HttpRequest, task_id: str) -> JsonResponse:
    """The sweep a `jobs.sweep_folder` task made, once a worker has started it (staff)."""
    if not (sees_everything(request.user) and sees_every_sweep(request.user)):
        raise Http404
    sweep = Sweep.objects.filter(task_id=task_id).first()
    if sweep is None:
        return JsonResponse({"id": None, "status": "queued", "over": False, "images": []})
    images = list(sweep.images.select_related("duplicate_of").order_by("id"))
    return JsonResponse(sweep_data(sweep, images, True))


# --- The upload page --------------------------------------------------------------------


@login_required(login_url=LOGIN_URL)
@require_GET
def upload_page(request: HttpRequest) -> HttpResponse:
    assert isinstance(request.user, User)  # login_required
    recent = list(
        Image.objects.filter(uploaded_by=request.user)
        .select_related("duplicate_of")
        .order_by("-queued_at", "-id")[:RECENT_UPLOADS]
    )
    staff = sees_everything(request.user)
    return render(
        request,
        "jobs/upload.html",
        {
            "form": UploadForm(initial={"sizes": default_sizes()}),
            "recent": [image_data(image, staff) for image in recent],
            "max_files": settings.UPLOAD_MAX_FILES,
            "max_bytes": settings.UPLOAD_MAX_BYTES,
            "max_pixels": settings.MAX_IMAGE_PIXELS,
            "staff": staff,
        },
    )


@accepts_uploads
@api_login_required
@require_POST
def upload(request: HttpRequest) -> JsonResponse:
    """Take uploaded images (multipart, field `images`, plus `sizes`) and queue them.

    The body was bounded before it was read (`jobs.upload_limits`): too large, too many
    files or a file over its limit never got further than the limit.
    """
    limiter = upload_handler_of(request)
    form = UploadForm(request.POST, request.FILES, refused=limiter.rejected)
    if limiter.refusal:
        refusal = limiter.refusal
        return upload_refused(refusal.message, refusal.status, refusal.code)
    if not form.is_valid():
        rejected = form.cleaned_data.get("rejected", []) if hasattr(form, "cleaned_data") else []
        return JsonResponse(
            {"errors": form.errors.get_json_data(), "rejected": rejected}, status=400
        )
    # Files first, outside any transaction: on SQLite (IMMEDIATE) atomic() takes the write
    # lock on entry, and writing and fsyncing the files may take long.
    assert isinstance(request.user, User)  # signed in, or the upload middleware refused it
    saved = uploads.save_uploads(form.cleaned_data["accepted"])
    try:
        with transaction.atomic():
            sweep, ids = uploads.claim_uploads(
                saved, form.cleaned_data["sizes"], request.user, form.cleaned_data["options"]
            )
            # Robust: with the broker down the upload still stands; jobs.recover requeues it.
            transaction.on_commit(lambda: queue_images(ids, uploaded=set(ids)), robust=True)
    except BaseException:
        uploads.discard_uploads(saved)
        raise
    images = list(Image.objects.filter(id__in=ids).order_by("id"))
    return JsonResponse(
        {
            "sweep": sweep_data(sweep, images, sees_everything(request.user)),
            "status_url": reverse("jobs:sweep-status", args=[sweep.id]),
            "rejected": form.cleaned_data["rejected"],
        },
        status=201,
    )


# --- Monitoring ---------------------------------------------------------------------------


@require_safe
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """No login: 200 when every check passes, 503 naming those that do not."""
    report = health.check()
    return JsonResponse(report.as_json(), status=200 if report.healthy else 503)


@require_GET
@never_cache
def metrics_page(request: HttpRequest) -> HttpResponse:
    """Prometheus text format, for the bearer of METRICS_TOKEN or, without one, loopback."""
    refusal = metrics_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(generate_latest(metrics.registry()), content_type=CONTENT_TYPE_LATEST)


def metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return None
        response = HttpResponse(
            "a valid bearer token is required\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    # Behind a reverse proxy on this host every request comes from loopback: set a token.
    if is_loopback(request.META.get("REMOTE_ADDR", "")):
        return None
    return HttpResponse(
        "metrics are served to loopback only when METRICS_TOKEN is not set\n",
        status=403,
        content_type="text/plain",
    )


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback

"""The admin tells the story: which sweep found what, and what became of every image.

Also the control room: sweep a folder now, reprocess or retry images, manage the periodic
sweeps through a form, and the dashboard (wired in project/urls.py).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django_celery_beat.admin import PeriodicTaskAdmin as BasePeriodicTaskAdmin
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks
from django_celery_results.admin import TaskResultAdmin as BaseTaskResultAdmin
from django_celery_results.models import TaskResult

from . import beat, broker, stats, storage, uploads
from .archives import archive_holder, sorted_thumbnails, zip_listing
from .forms import ReprocessForm, SweepNowForm, SweepTaskForm, default_sizes
from .links import preview_url, sweep_images_url, thumbnail_url
from .models import Heartbeat, Image, ScheduleActivity, Sweep, WebhookDelivery
from .sweeper import PRESET_CHOICES
from .tasks import SWEEP_TASK, queue_images, sweep_folder

logger = logging.getLogger(__name__)

admin.site.site_header = "Parroter"
admin.site.site_title = "Parroter"
admin.site.index_title = "Thumbnails: review and control"
admin.site.index_template = "admin/jobs/index.html"

STATUS_COLOURS: dict[str, str] = {
    Image.Status.PENDING: "#6c757d",
    Image.Status.PROCESSING: "#0d6efd",
    Image.Status.DONE: "#198754",
    Image.Status.FAILED: "#dc3545",
    Image.Status.DUPLICATE: "#6f42c1",
    Sweep.Status.RUNNING: "#0d6efd",
    Sweep.Status.SKIPPED: "#6c757d",
    WebhookDelivery.Status.SENDING: "#0d6efd",
    Sweep.Status.HELD: "#fd7e14",
}


def badge(status: str, label: str, colour: str | None = None) -> str:
    return format_html(
        '<span class="parroter-badge" style="background:{}">{}</span>',
        colour or STATUS_COLOURS.get(status, "#198754"),
        label,
    )


def seconds(delta: timedelta | None) -> str:
    return f"{delta.total_seconds():.2f} s" if delta is not None else "—"


def when(moment: datetime | None) -> str:
    """A time in the site's time zone, in the one format used throughout (with seconds)."""
    return date_format(timezone.localtime(moment), "DATETIME_FORMAT") if moment else "—"


def wrap_path(path: str) -> SafeString:
    """A path, escaped, that may break after each "/" on a narrow screen."""
    *parents, last = str(path).split("/")
    return format_html(
        "{}{}", format_html_join("", "{}/<wbr>", ((part,) for part in parents)), last
    )


def sizes_text(sizes: object) -> str:
    """Sizes for people: ["128x128", "256x256"] reads as two sizes with multiplication signs."""
    if isinstance(sizes, str):
        sizes = [size for size in re.split(r"[\s,]+", sizes) if size]
    if not isinstance(sizes, list | tuple) or not sizes:
        return "—"
    return ", ".join(re.sub(r"^(\d+)x(\d+)$", r"\1×\2", str(size)) for size in sizes)


def shortened(text: str, limit: int) -> str:
    """The start of a long text (an error naming paths), all of it in a tooltip."""
    if len(text) <= limit:
        return wrap_path(text)
    return format_html('<span title="{}">{}…</span>', text, wrap_path(text[: limit - 1].rstrip()))


def task_result_link(task_id: str) -> str:
    if not task_id:
        return "—"
    result = TaskResult.objects.filter(task_id=task_id).only("id", "status").first()
    if result is None:
        return format_html("{} <small>(no result stored yet)</small>", task_id)
    url = reverse("admin:django_celery_results_taskresult_change", args=[result.id])
    return format_html('<a href="{}">{}</a> ({})', url, task_id, result.status)


def options_text(options: dict[str, Any]) -> str:
    """Output options for people: what was asked, or the defaults that applied."""
    if not options:
        return f"defaults (JPEG_QUALITY, now {settings.JPEG_QUALITY}, for JPEG)"
    return ", ".join(f"{name} {value}" for name, value in sorted(options.items()))


class ParroterAdminMixin:
    empty_value_display = "—"

    class Media:
        css = {"all": ["jobs/admin.css"]}


class RecordAdminMixin(ParroterAdminMixin):
    """Sweeps and images are records of what happened: shown, never added or edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


# --- Sweeps -------------------------------------------------------------------------------


def schedule_names() -> list[str]:
    """Names of the periodic tasks that sent a recorded sweep, for the schedule filters."""
    return list(
        Sweep.objects.exclude(schedule_name="")
        .order_by("schedule_name")
        .values_list("schedule_name", flat=True)
        .distinct()
    )


class SweepScheduleFilter(admin.SimpleListFilter):
    """The periodic task that sent a sweep (sweeps of no schedule are under "trigger")."""

    title = "schedule"
    parameter_name = "schedule_name"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        names = schedule_names()
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Sweep]) -> QuerySet[Sweep]:
        return queryset.filter(schedule_name=self.value()) if self.value() else queryset


class OutcomeFilter(admin.SimpleListFilter):
    """Sweeps that found files, sweeps that claimed nothing, and failed ones.

    Idle scheduled sweeps leave no record (their schedule counts them), so "idle" lists
    the recorded sweeps that claimed nothing and did not fail: asked for by hand, only
    repairing or retrying, only seeing files still changing, skipped while another sweep
    of the folder ran, and idle ones recorded before.
    """

    title = "outcome"
    parameter_name = "outcome"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("found", "found files"), ("idle", "idle"), ("failed", "failed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Sweep]) -> QuerySet[Sweep]:
        if self.value() == "found":
            return queryset.filter(claimed__gt=0)
        if self.value() == "idle":
            return queryset.filter(claimed=0, status__in=(Sweep.Status.DONE, Sweep.Status.SKIPPED))
        if self.value() == "failed":
            return queryset.filter(status=Sweep.Status.FAILED)
        return queryset


@admin.register(Sweep)
class SweepAdmin(RecordAdminMixin, admin.ModelAdmin):
    # Merged columns keep the list within a laptop screen, what it found first; every figure
    # is on the sweep's page.
    list_display = [
        "id",
        "started",
        "status_badge",
        "seen",
        "claimed_link",
        "others",
        "sent_by",
        "folder_display",
        "short_error",
    ]
    list_filter = [OutcomeFilter, "status", "trigger", SweepScheduleFilter, "started_at"]
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ["folder", "schedule_name", "error", "task_id"]
    date_hierarchy = "started_at"
    change_list_template = "admin/jobs/sweep/change_list.html"
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "status_badge",
                    "trigger",
                    "schedule_name",
                    "folder_display",
                    "sizes_display",
                    "output_options",
                ]
            },
        ),
        (
            "What it found",
            {"fields": ["seen", "claimed", "unstable", "ignored", "requeued", "images_link"]},
        ),
        ("Timing", {"fields": ["started_at", "finished_at", "took"]}),
        ("Tracking", {"fields": ["error", "task_result", "requested_by"]}),
    ]
    # Nothing here is edited by hand: every field shown is read-only.
    readonly_fields = [name for _, section in fieldsets for name in section["fields"]]  # type: ignore[misc]

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Sweep) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="took")
    def took(self, obj: Sweep) -> str:
        return seconds(obj.duration)

    @admin.display(description="started", ordering="started_at")
    def started(self, obj: Sweep) -> str:
        if obj.duration is None:
            return when(obj.started_at)
        return format_html(
            '{}<br><small class="parroter-muted">took {}</small>',
            when(obj.started_at),
            seconds(obj.duration),
        )

    @admin.display(description="sent by", ordering="schedule_name")
    def sent_by(self, obj: Sweep) -> str:
        if obj.schedule_name:
            return obj.schedule_name
        senders: dict[str, str] = {
            Sweep.Trigger.MANUAL: "sweep now / command",
            Sweep.Trigger.UPLOAD: "upload page",
        }
        return senders.get(obj.trigger, obj.get_trigger_display())

    @admin.display(description="folder", ordering="folder")
    def folder_display(self, obj: Sweep) -> str:
        return wrap_path(obj.folder)

    @admin.display(description="sizes")
    def sizes_display(self, obj: Sweep) -> str:
        return sizes_text(obj.sizes)

    @admin.display(description="claimed", ordering="claimed")
    def claimed_link(self, obj: Sweep) -> str:
        url = sweep_images_url(obj.id)
        return format_html('<a href="{}" title="its images">{}</a>', url, obj.claimed)

    @admin.display(description="also")
    def others(self, obj: Sweep) -> str:
        counts = [
            (obj.unstable, "still changing", Sweep._meta.get_field("unstable").help_text),
            (obj.ignored, "ignored", Sweep._meta.get_field("ignored").help_text),
            (obj.requeued, "redone", Sweep._meta.get_field("requeued").help_text),
        ]
        shown = [(count, label, why) for count, label, why in counts if count]
        if not shown:
            return "—"
        return format_html_join("", '<span class="parroter-line" title="{2}">{0} {1}</span>', shown)

    @admin.display(description="output options")
    def output_options(self, obj: Sweep) -> str:
        return options_text(obj.options)

    @admin.display(description="images")
    def images_link(self, obj: Sweep) -> str:
        url = sweep_images_url(obj.id)
        return format_html('<a href="{}">{} claimed</a>', url, obj.claimed)

    @admin.display(description="error")
    def short_error(self, obj: Sweep) -> str:
        return shortened(obj.error, 90)

    @admin.display(description="task result")
    def task_result(self, obj: Sweep) -> str:
        return task_result_link(obj.task_id)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "sweep-now/",
                self.admin_site.admin_view(self.sweep_now_view),
                name="jobs_sweep_now",
            ),
            path(
                "sweep-now/<str:task_id>/",
                self.admin_site.admin_view(self.sweep_progress_view),
                name="jobs_sweep_progress",
            ),
            *super().get_urls(),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        extra_context = {**(extra_context or {}), "can_sweep_now": can_sweep_now(request)}
        return super().changelist_view(request, extra_context)

    def sweep_now_view(self, request: HttpRequest) -> HttpResponse:
        if not can_sweep_now(request):
            raise PermissionDenied
        if request.method == "POST":
            form = SweepNowForm(request.POST)
            if form.is_valid():
                task_id = str(uuid4())
                data = form.cleaned_data
                sweep_folder.apply_async(
                    kwargs={"folder": data["folder"], "sizes": data["sizes"]}, task_id=task_id
                )
                return HttpResponseRedirect(reverse("admin:jobs_sweep_progress", args=[task_id]))
        else:
            form = SweepNowForm(
                initial={
                    "folder": request.GET.get("folder") or str(settings.WATCH_FOLDER),
                    "sizes": request.GET.get("sizes") or default_sizes(),
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": "Sweep a folder now",
            "opts": self.opts,
            "form": form,
            "known_folders": known_folders(),
        }
        return TemplateResponse(request, "admin/jobs/sweep_now.html", context)

    def sweep_progress_view(self, request: HttpRequest, task_id: str) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": "Sweep progress",
            "opts": self.opts,
            "status_url": reverse("jobs:sweep-by-task", args=[task_id]),
            "task_id": task_id,
        }
        return TemplateResponse(request, "admin/jobs/sweep_progress.html", context)


def can_sweep_now(request: HttpRequest) -> bool:
    return request.user.has_perm("jobs.sweep_now")


def known_folders() -> list[str]:
    """The watch folder and the folders of the periodic sweeps, for the folder field."""
    folders = [str(settings.WATCH_FOLDER)]
    for task in PeriodicTask.objects.filter(task=SWEEP_TASK).only("kwargs"):
        folder = beat.sweep_kwargs(task).get("folder")
        if isinstance(folder, str) and folder and folder not in folders:
            folders.append(folder)
    return folders


# --- Images -------------------------------------------------------------------------------


class ScheduleFilter(admin.SimpleListFilter):
    """The periodic task that swept an image, or how it came otherwise."""

    title = "schedule"
    parameter_name = "schedule"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        names = schedule_names()
        return [
            *[(f"task:{name}", name) for name in names],
            ("manual", "sweep now / command"),
            ("upload", "upload page"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> QuerySet[Image]:
        value = self.value()
        if not value:
            return queryset
        if value.startswith("task:"):
            return queryset.filter(sweep__schedule_name=value[5:])
        if value == "manual":
            return queryset.filter(sweep__trigger=Sweep.Trigger.MANUAL)
        if value == "upload":
            return queryset.filter(source=Image.Source.UPLOAD)
        return queryset


class FormatFilter(admin.SimpleListFilter):
    """The format an image was read as; failed and duplicate images have none recorded."""

    title = "format"
    parameter_name = "format"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        formats = (
            Image.objects.exclude(format="")
            .order_by("format")
            .values_list("format", flat=True)
            .distinct()
        )
        return [*[(name, name) for name in formats], ("none", "none recorded")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> QuerySet[Image]:
        if self.value() == "none":
            return queryset.filter(format="")
        return queryset.filter(format=self.value()) if self.value() else queryset


@admin.register(Image)
class ImageAdmin(RecordAdminMixin, admin.ModelAdmin):
    # Merged columns keep the list within a laptop screen; each figure is on the image's page.
    list_display = [
        "preview",
        "name_display",
        "status_badge",
        "sizes_made",
        "archive_size_display",
        "schedule",
        "finished",
    ]
    list_display_links = ["preview", "name_display"]
    list_filter = ["status", ScheduleFilter, "source", "finished_at", FormatFilter]
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ["name", "=sha256", "source_path", "error"]
    date_hierarchy = "queued_at"
    list_select_related = ["sweep", "duplicate_of"]
    list_per_page = 50
    actions = ["reprocess", "retry_failed", "delete_selected"]
    change_form_template = "admin/jobs/image/change_form.html"
    delete_selected_confirmation_template = "admin/jobs/image/delete_selected_confirmation.html"
    delete_confirmation_template = "admin/jobs/image/delete_confirmation.html"
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "status_badge",
                    "path_name",
                    "source",
                    "uploaded_by",
                    "folder_display",
                    "sweep_link",
                    "duplicate_link",
                ]
            },
        ),
        ("Failure", {"fields": ["error_block"], "classes": ["parroter-failure"]}),
        (
            "Result",
            {
                "fields": [
                    "pixels",
                    "format",
                    "file_size_display",
                    "sizes_asked",
                    "output_options",
                    "notes",
                    "gallery",
                    "zip_contents",
                    "archive_size_display",
                    "download_button",
                ]
            },
        ),
        (
            "Tracking",
            {
                "fields": [
                    "sha256",
                    "task_result",
                    "attempts",
                    "worker",
                    "token",
                    "lease_until",
                    "queued_at",
                    "started_at",
                    "finished_at",
                    "took",
                ]
            },
        ),
        ("Files", {"fields": ["source_path_display", "original_path_display", "archive_display"]}),
    ]
    # Nothing here is edited by hand: every field shown is read-only.
    readonly_fields = [name for _, section in fieldsets for name in section["fields"]]  # type: ignore[misc]

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("jobs.reprocess_image")

    def get_fieldsets(self, request: HttpRequest, obj: Image | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.error:
            return fieldsets
        return [fieldset for fieldset in fieldsets if fieldset[0] != "Failure"]

    # --- columns and fields

    @admin.display(description="")
    def preview(self, obj: Image) -> str:
        url = preview_url(obj)
        if url is None:
            return format_html('<span class="parroter-nopreview">{}</span>', "no preview")
        return format_html(
            '<img class="parroter-preview" src="{}" alt="" loading="lazy" width="64">', url
        )

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Image) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="name", ordering="name")
    def name_display(self, obj: Image) -> str:
        facts = [f"{obj.width}×{obj.height}" if obj.width else "", obj.format]
        facts.append(filesizeformat(obj.file_size))
        return format_html(
            '{}<br><small class="parroter-muted">{}</small>',
            wrap_path(obj.name),
            " · ".join(fact for fact in facts if fact),
        )

    @admin.display(description="name")
    def path_name(self, obj: Image) -> str:
        return wrap_path(obj.name)

    @admin.display(description="folder")
    def folder_display(self, obj: Image) -> str:
        return wrap_path(obj.folder)

    @admin.display(description="pixels")
    def pixels(self, obj: Image) -> str:
        return f"{obj.width}×{obj.height}" if obj.width else "—"

    @admin.display(description="sizes")
    def sizes_made(self, obj: Image) -> str:
        holder = archive_holder(obj)
        made = holder.thumbnails if holder else {}
        if not made:
            return format_html('<span class="parroter-muted">{}</span>', sizes_text(obj.sizes))
        return ", ".join(f"{width}×{height}" for _, width, height in sorted_thumbnails(made))

    @admin.display(description="sizes asked")
    def sizes_asked(self, obj: Image) -> str:
        return sizes_text(obj.sizes)

    @admin.display(description="output options")
    def output_options(self, obj: Image) -> str:
        return options_text(obj.options)

    @admin.display(description="archive", ordering="archive_size")
    def archive_size_display(self, obj: Image) -> str:
        holder = archive_holder(obj)
        if holder is None or not holder.archive_size:
            return "—"
        return format_html(
            '<a href="{}" title="download the zip">{}</a>',
            reverse("jobs:archive", args=[obj.id]),
            filesizeformat(holder.archive_size),
        )

    @admin.display(description="file size", ordering="file_size")
    def file_size_display(self, obj: Image) -> str:
        return filesizeformat(obj.file_size)

    @admin.display(description="took")
    def took(self, obj: Image) -> str:
        return seconds(obj.duration)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj: Image) -> str:
        if obj.duration is None:
            return when(obj.finished_at)
        return format_html(
            '{}<br><small class="parroter-muted">took {}</small>',
            when(obj.finished_at),
            seconds(obj.duration),
        )

    @admin.display(description="source path")
    def source_path_display(self, obj: Image) -> str:
        return wrap_path(obj.source_path)

    @admin.display(description="original path")
    def original_path_display(self, obj: Image) -> str:
        return wrap_path(obj.original_path) if obj.original_path else "—"

    @admin.display(description="archive (under MEDIA_ROOT)")
    def archive_display(self, obj: Image) -> str:
        return wrap_path(obj.archive) if obj.archive else "—"

    @admin.display(description="schedule", ordering="sweep__schedule_name")
    def schedule(self, obj: Image) -> str:
        if obj.sweep and obj.sweep.schedule_name:
            return obj.sweep.schedule_name
        if obj.source == Image.Source.UPLOAD:
            return "upload"
        return "sweep now" if obj.sweep else "—"

    @admin.display(description="sweep")
    def sweep_link(self, obj: Image) -> str:
        if obj.sweep_id is None:
            return "—"
        url = reverse("admin:jobs_sweep_change", args=[obj.sweep_id])
        return format_html('<a href="{}">{}</a>', url, obj.sweep)

    @admin.display(description="duplicate of")
    def duplicate_link(self, obj: Image) -> str:
        if obj.duplicate_of_id is None:
            return "—"
        url = reverse("admin:jobs_image_change", args=[obj.duplicate_of_id])
        return format_html('<a href="{}">#{} {}</a>', url, obj.duplicate_of_id, obj.duplicate_of)

    @admin.display(description="error")
    def error_block(self, obj: Image) -> str:
        return format_html('<pre class="parroter-error">{}</pre>', obj.error or "—")

    @admin.display(description="thumbnails")
    def gallery(self, obj: Image) -> str:
        holder = archive_holder(obj)
        if holder is None or not holder.thumbnails:
            return "—"
        return format_html(
            '<div class="parroter-gallery">{}</div>',
            format_html_join(
                "",
                '<figure><img src="{}" width="{}" height="{}" alt="{}">'
                "<figcaption>{} → {}×{}</figcaption></figure>",
                (
                    (thumbnail_url(obj, label), width, height, label, label, width, height)
                    for label, width, height in sorted_thumbnails(holder.thumbnails)
                ),
            ),
        )

    @admin.display(description="zip contents")
    def zip_contents(self, obj: Image) -> str:
        listing = zip_listing(obj)
        if listing is None:
            return "—"
        return format_html(
            '<table class="parroter-zip"><tbody>{}</tbody></table>',
            format_html_join(
                "",
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                ((name, filesizeformat(size)) for name, size in listing),
            ),
        )

    @admin.display(description="download")
    def download_button(self, obj: Image) -> str:
        if archive_holder(obj) is None:
            return "—"
        note = "" if obj.status == Image.Status.DONE else " (from an earlier run)"
        return format_html(
            '<a class="button" href="{}">Download zip</a>{}',
            reverse("jobs:archive", args=[obj.id]),
            note,
        )

    @admin.display(description="task result")
    def task_result(self, obj: Image) -> str:
        return task_result_link(obj.task_id)

    # --- actions

    @admin.action(description="Reprocess selected images…", permissions=["reprocess"])
    def reprocess(self, request: HttpRequest, queryset: QuerySet[Image]) -> HttpResponse:
        ids = ",".join(str(pk) for pk in queryset.values_list("id", flat=True))
        return HttpResponseRedirect(reverse("admin:jobs_image_reprocess") + f"?ids={ids}")

    @admin.action(description="Retry selected failed images", permissions=["reprocess"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        failed = list(queryset.filter(status=Image.Status.FAILED))
        if not failed:
            self.message_user(request, "None of the selected images failed.", messages.WARNING)
            return
        self.requeue(request, failed, None)

    def requeue(
        self,
        request: HttpRequest,
        images: list[Image],
        sizes: list[str] | None,
        options: dict[str, Any] | None = None,
    ) -> None:
        result = uploads.claim_again(images, sizes, options)
        if result.queued:
            queued = result.queued
            transaction.on_commit(lambda: queue_images(queued))
            self.message_user(
                request,
                f"{len(queued)} image(s) queued again"
                + (f" with sizes {', '.join(sizes)}" if sizes else "")
                + "; their old archives stay until the new ones are made.",
                messages.SUCCESS,
            )
        for image, reason in result.skipped:
            self.message_user(
                request, f"{image.name} (#{image.id}) left alone: {reason}", messages.WARNING
            )

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "reprocess/",
                self.admin_site.admin_view(self.reprocess_view),
                name="jobs_image_reprocess",
            ),
            *super().get_urls(),
        ]

    def reprocess_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_reprocess_permission(request):
            raise PermissionDenied
        raw = request.POST.get("ids") or request.GET.get("ids") or ""
        ids = [int(part) for part in raw.split(",") if part.strip().isdigit()]
        images = list(Image.objects.filter(id__in=ids).order_by("id"))
        if request.method == "POST":
            form = ReprocessForm(request.POST)
            if form.is_valid() and images:
                self.requeue(
                    request, images, form.cleaned_data["sizes"], form.cleaned_data["options"]
                )
                url = reverse("admin:jobs_image_changelist")
                if len(images) == 1:
                    url = reverse("admin:jobs_image_change", args=[images[0].id])
                return HttpResponseRedirect(url)
        else:
            current = {image.sizes_key for image in images}
            sizes = images[0].sizes if len(current) == 1 else settings.THUMBNAIL_SIZES
            form = ReprocessForm(initial={"sizes": ", ".join(sizes)})
        context = {
            **self.admin_site.each_context(request),
            "title": "Reprocess images",
            "opts": self.opts,
            "form": form,
            "images": [(image, uploads.why_not_reprocess(image)) for image in images],
            "ids": ",".join(str(image.id) for image in images),
        }
        return TemplateResponse(request, "admin/jobs/image/reprocess.html", context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> Any:
        extra_context = {
            **(extra_context or {}),
            "can_reprocess": self.has_reprocess_permission(request),
        }
        return super().changeform_view(request, object_id, form_url, extra_context)

    # --- deleting records with their archives

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        self.delete_queryset(request, Image.objects.filter(id=obj.id))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        busy = queryset.exclude(status__in=Image.FINAL_STATUSES)
        if busy.exists():
            self.message_user(
                request,
                f"{busy.count()} image(s) still being processed were kept; delete them once "
                "they are finished.",
                messages.WARNING,
            )
        with transaction.atomic():
            final = queryset.filter(status__in=Image.FINAL_STATUSES).select_related(None)
            # A zip that duplicates outside this deletion still use stays, with its image.
            used = uploads.duplicates_using(final)
            for image in final.filter(id__in=list(used)).only("id", "name"):
                self.message_user(
                    request,
                    f"{image.name} (#{image.id}) was kept: "
                    f"{uploads.duplicates_reason(used[image.id])}; "
                    "select its duplicates too to delete them together",
                    messages.WARNING,
                )
            final = final.exclude(id__in=list(used))
            archives = list(final.values_list("archive", flat=True))
            final.delete()
            # Files go only once the records are gone for good.
            transaction.on_commit(lambda: storage.remove_archives(archives))


# --- Periodic tasks -----------------------------------------------------------------------


class OwnerFilter(admin.SimpleListFilter):
    title = "defined in"
    parameter_name = "owner"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("settings", "settings"), ("admin", "admin")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "settings":
            return queryset.filter(name__in=beat.settings_owned_names())
        if self.value() == "admin":
            return queryset.exclude(name__in=beat.settings_owned_names())
        return queryset


admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(ParroterAdminMixin, BasePeriodicTaskAdmin):
    """Periodic tasks, with a form of sweep fields for sweeps and settings rows read-only."""

    form = SweepTaskForm
    # django-celery-beat's own form script shows "Translation: undefined" whenever no crontab
    # is chosen or one was just added: ours shows the chosen crontab in words, or nothing.
    change_form_template = "admin/jobs/periodictask/change_form.html"
    # What a person looks for first comes first: it stays in view on the narrowest screen.
    list_display = [
        "name",
        "enabled",
        "schedule_display",
        "next_run",
        "last_sweep",
        "sweeps",
        "owner",
        "idle_sweeps",
    ]
    list_filter = ["enabled", OwnerFilter, "task"]
    fieldsets = [
        (None, {"fields": ["name", "regtask", "task", "enabled", "description"]}),
        (
            "Sweep: what and where",
            {
                "fields": [
                    "folder",
                    "sizes",
                    "quality",
                    ("format", "fit", "gravity"),
                    ("metadata", "gps", "colour"),
                ],
                "description": "For the task jobs.sweep_folder: these fields write its "
                "keyword arguments, checked before saving.",
            },
        ),
        (
            "Schedule",
            {
                "fields": [
                    "interval",
                    "crontab",
                    "solar",
                    "clocked",
                    "start_time",
                    "last_run_at",
                    "one_off",
                ]
            },
        ),
        ("Arguments", {"fields": ["args", "kwargs"], "classes": ["collapse"]}),
        (
            "Execution options",
            {
                "fields": [
                    "expires",
                    "expire_seconds",
                    "queue",
                    "exchange",
                    "routing_key",
                    "priority",
                    "headers",
                ],
                "classes": ["collapse"],
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PeriodicTask]:
        last = Sweep.objects.filter(schedule_name=OuterRef("name")).order_by("-started_at", "-id")
        activity = ScheduleActivity.objects.filter(schedule_name=OuterRef("name"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_sweep_id=Subquery(last.values("id")[:1]),
                last_sweep_status=Subquery(last.values("status")[:1]),
                last_sweep_claimed=Subquery(last.values("claimed")[:1]),
                last_sweep_error=Subquery(last.values("error")[:1]),
                idle_count=Subquery(activity.values("idle_sweeps")[:1]),
                swept_at=Subquery(activity.values("swept_at")[:1]),
            )
        )

    def get_fieldsets(self, request: HttpRequest, obj: PeriodicTask | None = None) -> list:
        if obj is not None and beat.is_settings_owned(obj):
            return [
                (None, {"fields": ["name", "owner", "task", "enabled", "description"]}),
                ("Schedule", {"fields": ["schedule_display", "next_run", "last_run_at"]}),
                ("Arguments", {"fields": ["args", "kwargs"]}),
                ("Last sweep", {"fields": ["last_sweep", "idle_sweeps"]}),
            ]
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None:
            status = ["owner", "next_run", "last_sweep", "idle_sweeps"]
            fieldsets = [*fieldsets, ("Status", {"fields": status})]
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: PeriodicTask | None = None) -> list:
        fields = [*super().get_readonly_fields(request, obj), "owner", "next_run", "last_sweep"]
        fields.append("idle_sweeps")
        if obj is not None and beat.is_settings_owned(obj):
            fields += ["name", "task", "enabled", "description", "schedule_display", "args"]
            fields += ["kwargs"]
        return fields

    def has_change_permission(self, request: HttpRequest, obj: PeriodicTask | None = None) -> bool:
        if obj is not None and beat.is_settings_owned(obj):
            return False
        return super().has_change_permission(request, obj)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "crontab-words/<int:crontab_id>/",
                self.admin_site.admin_view(self.crontab_words_view),
                name="jobs_crontab_words",
            ),
            *super().get_urls(),
        ]

    def crontab_words_view(self, request: HttpRequest, crontab_id: int) -> JsonResponse:
        """A crontab in words, for one added through the form's "+" after the page loaded."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        crontab = CrontabSchedule.objects.filter(id=crontab_id).first()
        if crontab is None:
            raise Http404("no such crontab")
        return JsonResponse({"id": crontab.id, "words": crontab.human_readable})

    def has_delete_permission(self, request: HttpRequest, obj: PeriodicTask | None = None) -> bool:
        if obj is not None and beat.is_settings_owned(obj):
            return False
        return super().has_delete_permission(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        owned = queryset.filter(name__in=beat.settings_owned_names())
        if owned.exists():
            self.message_user(
                request,
                "Tasks defined in settings were kept: beat would write them again.",
                messages.WARNING,
            )
        super().delete_queryset(request, queryset.exclude(name__in=beat.settings_owned_names()))
        PeriodicTasks.update_changed()

    @admin.display(description="defined in")
    def owner(self, obj: PeriodicTask) -> str:
        if beat.is_settings_owned(obj):
            return badge("", "settings", "#6c757d")
        return badge("", "admin", "#0d6efd")

    @admin.display(description="schedule")
    def schedule_display(self, obj: PeriodicTask) -> str:
        return str(obj.scheduler) if obj.scheduler else "—"

    @admin.display(description="folder and sizes")
    def sweeps(self, obj: PeriodicTask) -> str:
        if obj.task != SWEEP_TASK:
            return obj.task
        kwargs = beat.sweep_kwargs(obj)
        sizes = sizes_text(kwargs["sizes"]) if kwargs.get("sizes") else "default sizes"
        if kwargs.get("quality") is not None:
            sizes += f"; quality {kwargs['quality']}"
        preset = [f"{name} {kwargs[name]}" for name in PRESET_CHOICES if kwargs.get(name)]
        if kwargs.get("gps"):
            preset.append("GPS kept")
        if preset:
            sizes += "; " + ", ".join(preset)
        return format_html(
            '<code>{}</code><br><small class="parroter-muted">{}</small>',
            wrap_path(str(kwargs.get("folder") or settings.WATCH_FOLDER)),
            sizes,
        )

    @admin.display(description=f"next run ({settings.TIME_ZONE})")
    def next_run(self, obj: PeriodicTask) -> Any:
        due = beat.next_run(obj)
        if due is None:
            return "—" if obj.enabled else "disabled"
        return when(due)

    @admin.display(description="last sweep")
    def last_sweep(self, obj: PeriodicTask) -> str:
        sweep_id = getattr(obj, "last_sweep_id", None)
        if sweep_id is None:
            last = Sweep.objects.filter(schedule_name=obj.name).first()
            if last is None:
                return "—"
            sweep_id, status, claimed, error = last.id, last.status, last.claimed, last.error
        else:
            status = obj.last_sweep_status
            claimed, error = obj.last_sweep_claimed, obj.last_sweep_error
        url = reverse("admin:jobs_sweep_change", args=[sweep_id])
        label = Sweep.Status(status).label if status in Sweep.Status.values else status
        detail = shortened(error, 80) if error else f"{claimed} claimed"
        return format_html('<a href="{}">{}</a> {}', url, badge(status, label), detail)

    @admin.display(description="idle sweeps")
    def idle_sweeps(self, obj: PeriodicTask) -> str:
        """Sweeps that found nothing (not recorded one by one), and when one last ran."""
        if obj.task != SWEEP_TASK:
            return "—"
        if hasattr(obj, "idle_count"):
            count, ran = obj.idle_count, obj.swept_at
        else:
            activity = ScheduleActivity.objects.filter(schedule_name=obj.name).first()
            count, ran = (activity.idle_sweeps, activity.swept_at) if activity else (0, None)
        # A worker writes swept_at on every sweep; beat writes last_run_at every few minutes.
        ran_text = date_format(timezone.localtime(ran), "j M H:i:s") if ran else "never"
        return format_html("{}<br><small>last run {}</small>", f"{count or 0:,}", ran_text)


# --- Task results -------------------------------------------------------------------------

# Celery keeps a task's arguments as a repr (at most 1,024 characters); nothing longer is read.
ARGUMENTS_LIMIT = 4096
TASK_STATE_COLOURS = {
    "SUCCESS": "#198754",
    "FAILURE": "#dc3545",
    "STARTED": "#0d6efd",
    "RETRY": "#b35c00",
    "PENDING": "#6c757d",
    "RECEIVED": "#6c757d",
    "REVOKED": "#6c757d",
}


def stored_value(text: str | None) -> Any:
    """A result as django-celery-results stores it (JSON), or the text as is."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def stored_arguments(text: str | None) -> Any:
    """Arguments as django-celery-results stores them: JSON holding Celery's repr of them
    (argsrepr/kwargsrepr), read back as Python literals; otherwise the text as is.
    """
    value = stored_value(text)
    if isinstance(value, str) and len(value) <= ARGUMENTS_LIMIT:
        try:
            # Literals only, never code; a repr that Celery cut short may not parse: text.
            return ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def value_text(value: Any, limit: int | None = None) -> SafeString:
    """One argument or result for people: lists joined, paths breakable at "/", a text
    longer than `limit` cut short with all of it in a tooltip.
    """
    if value is Ellipsis:
        return format_html("{}", "…")  # where Celery's repr left the rest out
    if isinstance(value, list | tuple | set):
        return format_html_join(", ", "{}", ((value_text(item, limit),) for item in value))
    if isinstance(value, dict):
        value = json.dumps(value, default=str)
    text = str(value)
    if limit is not None and len(text) > limit:
        return format_html('<span title="{}">{}…</span>', text, wrap_path(text[:limit]))
    return wrap_path(text)


def arguments_of(task: TaskResult) -> list[tuple[str, Any]]:
    """(name, value) per argument: positional ones numbered, then the keyword ones."""
    args = stored_arguments(task.task_args)
    kwargs = stored_arguments(task.task_kwargs)
    rows: list[tuple[str, Any]] = []
    if isinstance(args, list | tuple):
        rows += [(f"#{number}", value) for number, value in enumerate(args, 1)]
    elif args:
        rows.append(("arguments", args))
    if isinstance(kwargs, dict):
        rows += [(str(name), value) for name, value in kwargs.items()]
    elif kwargs:
        rows.append(("keyword arguments", kwargs))
    return rows


class PeriodicTaskNameFilter(admin.SimpleListFilter):
    title = "periodic task"
    parameter_name = "periodic_task"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        names = (
            TaskResult.objects.exclude(periodic_task_name__isnull=True)
            .exclude(periodic_task_name="")
            .order_by("periodic_task_name")
            .values_list("periodic_task_name", flat=True)
            .distinct()
        )
        return [*[(f"task:{name}", name) for name in names], ("none", "none (sent otherwise)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "none":
            return queryset.filter(Q(periodic_task_name__isnull=True) | Q(periodic_task_name=""))
        if value and value.startswith("task:"):
            return queryset.filter(periodic_task_name=value[5:])
        return queryset


admin.site.unregister(TaskResult)


@admin.register(TaskResult)
class TaskResultAdmin(RecordAdminMixin, BaseTaskResultAdmin):
    """Celery's task results, with their arguments and results readable."""

    list_display = [
        "task",
        "status_badge",
        "completed",
        "periodic_task_name",
        "arguments",
        "worker",
    ]
    list_display_links = ["task"]
    list_filter = ["status", "date_done", PeriodicTaskNameFilter, "task_name", "worker"]
    fieldsets = [
        (None, {"fields": ["task_id", "task_name", "periodic_task_name", "status", "worker"]}),
        ("Arguments", {"fields": ["arguments_table"]}),
        (
            "Result",
            {
                "fields": [
                    "result_display",
                    "date_created",
                    "date_started",
                    "date_done",
                    "traceback",
                ]
            },
        ),
        (
            "As stored",
            {"fields": ["content_type", "content_encoding", "meta"], "classes": ["collapse"]},
        ),
    ]

    @admin.display(description="task", ordering="task_name")
    def task(self, obj: TaskResult) -> str:
        return format_html(
            '{}<br><small class="parroter-muted" title="{}">{}…</small>',
            obj.task_name or "(unnamed)",
            obj.task_id,
            obj.task_id[:8],
        )

    @admin.display(description="arguments")
    def arguments(self, obj: TaskResult) -> str:
        rows = arguments_of(obj)
        if not rows:
            return "—"
        return format_html_join(
            "",
            '<span class="parroter-line">{}: {}</span>',
            ((name, value_text(value, limit=200)) for name, value in rows),
        )

    @admin.display(description="completed", ordering="date_done")
    def completed(self, obj: TaskResult) -> str:
        return when(obj.date_done)

    @admin.display(description="state", ordering="status")
    def status_badge(self, obj: TaskResult) -> str:
        return badge(obj.status, obj.status, TASK_STATE_COLOURS.get(obj.status, "#6c757d"))

    @admin.display(description="arguments")
    def arguments_table(self, obj: TaskResult) -> str:
        rows = arguments_of(obj)
        if not rows:
            return "none"
        return format_html(
            '<table class="parroter-args"><tbody>{}</tbody></table>',
            format_html_join(
                "",
                "<tr><th>{}</th><td>{}</td></tr>",
                ((name, value_text(value)) for name, value in rows),
            ),
        )

    @admin.display(description="result")
    def result_display(self, obj: TaskResult) -> str:
        result = stored_value(obj.result)
        if result is None:
            return "—"
        if isinstance(result, dict):
            return format_html(
                '<table class="parroter-args"><tbody>{}</tbody></table>',
                format_html_join(
                    "",
                    "<tr><th>{}</th><td>{}</td></tr>",
                    ((name, value_text(value)) for name, value in result.items()),
                ),
            )
        return value_text(result)


# --- Dashboard ----------------------------------------------------------------------------


def dashboard(request: HttpRequest) -> HttpResponse:
    """How the system is doing, at a glance (staff; wired in project/urls.py)."""
    if not request.user.has_perm("jobs.view_image"):
        raise PermissionDenied
    try:
        days = min(max(int(request.GET.get("days", 2)), 1), 14)
    except ValueError:
        days = 2
    since = timezone.now() - timedelta(hours=24)
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "days": days,
        "day_choices": [1, 2, 7, 14],
        "chart": stats.hourly_chart(days),
        "throughput": stats.recent_throughput(),
        "queue": broker.queue_state(timeout=0.5),
        "oldest": stats.oldest_waiting(),
        "counts": stats.status_counts(since),
        "disk": stats.archive_disk(),
        "schedules": stats.schedule_activity(),
        "retention": stats.retention(),
        "recent_failures": Image.objects.filter(status=Image.Status.FAILED)
        .order_by("-finished_at")
        .only("id", "name", "error", "finished_at")[:5],
        "now": timezone.now(),
        "time_zone": settings.TIME_ZONE,
        "can_sweep_now": can_sweep_now(request),
    }
    return TemplateResponse(request, "admin/jobs/dashboard.html", context)


# --- Operations ---------------------------------------------------------------------------


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(RecordAdminMixin, admin.ModelAdmin):
    """The webhook outbox: what was owed to whom, and what became of it."""

    list_display = [
        "id",
        "created_at",
        "event",
        "image_link",
        "url",
        "status_badge",
        "attempts",
        "response_code",
        "next_try_at",
        "sent_at",
    ]
    list_filter = ["status", "event", "created_at"]
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ["url", "image__name", "last_error"]
    date_hierarchy = "created_at"
    list_select_related = ["image"]
    fields = [
        "event",
        "image_link",
        "url",
        "status_badge",
        "attempts",
        "next_try_at",
        "claimed_by",
        "claimed_at",
        "response_code",
        "last_response",
        "last_error",
        "created_at",
        "sent_at",
        "run",
        "payload",
    ]
    readonly_fields = fields  # type: ignore[assignment]

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: WebhookDelivery) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="image", ordering="image")
    def image_link(self, obj: WebhookDelivery) -> str:
        if obj.image is None:
            return "— (deleted)"
        url = reverse("admin:jobs_image_change", args=[obj.image_id])
        return format_html('<a href="{}">{}</a>', url, obj.image.name)

    @admin.display(description="payload (as sent)")
    def payload(self, obj: WebhookDelivery) -> str:
        try:
            text = json.dumps(json.loads(obj.body), indent=2, ensure_ascii=False)
        except ValueError:
            text = obj.body
        return format_html("<pre>{}</pre>", text)


@admin.register(Heartbeat)
class HeartbeatAdmin(RecordAdminMixin, admin.ModelAdmin):
    """Signs of life read by /healthz. Deleting a folder's row forgets its remembered mount."""

    list_display = ["kind", "name", "seen_at", "detail"]
    list_filter = ["kind"]
    search_fields = ["name"]
    readonly_fields = ["kind", "name", "seen_at", "detail"]

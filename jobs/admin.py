"""The admin tells the story: which sweep found what, and what became of every image."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html

from .models import Image, Sweep

STATUS_COLOURS = {
    Image.Status.PENDING: "#6c757d",
    Image.Status.PROCESSING: "#0d6efd",
    Image.Status.DONE: "#198754",
    Image.Status.FAILED: "#dc3545",
    Image.Status.DUPLICATE: "#6f42c1",
    Sweep.Status.RUNNING: "#0d6efd",
    Sweep.Status.SKIPPED: "#6c757d",
}


def badge(status: str, label: str) -> str:
    return format_html(
        '<span style="background:{};color:#fff;padding:2px 8px;border-radius:9px;'
        'font-size:11px;white-space:nowrap">{}</span>',
        STATUS_COLOURS.get(status, "#198754"),
        label,
    )


def seconds(delta) -> str:
    return f"{delta.total_seconds():.2f} s" if delta is not None else "—"


@admin.register(Sweep)
class SweepAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "started_at",
        "status_badge",
        "trigger",
        "schedule_name",
        "folder",
        "seen",
        "claimed",
        "unstable",
        "ignored",
        "requeued",
        "took",
        "images_link",
        "short_error",
    ]
    list_filter = ["status", "trigger", "schedule_name", "started_at"]
    search_fields = ["folder", "schedule_name", "error", "task_id"]
    date_hierarchy = "started_at"
    readonly_fields = [field.name for field in Sweep._meta.fields] + ["took", "images_link"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Sweep | None = None) -> bool:
        return False

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Sweep) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="took")
    def took(self, obj: Sweep) -> str:
        return seconds(obj.duration)

    @admin.display(description="images")
    def images_link(self, obj: Sweep) -> str:
        url = reverse("admin:jobs_image_changelist") + f"?sweep__id__exact={obj.id}"
        return format_html('<a href="{}">{} claimed</a>', url, obj.claimed)

    @admin.display(description="error")
    def short_error(self, obj: Sweep) -> str:
        return obj.error[:120]


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "status_badge",
        "pixels",
        "sizes_made",
        "archive_size_display",
        "took",
        "schedule",
        "finished_at",
        "download",
    ]
    list_filter = ["status", "source", "sweep__schedule_name", "queued_at", "format"]
    search_fields = ["name", "sha256", "source_path", "error"]
    date_hierarchy = "queued_at"
    list_select_related = ["sweep"]
    readonly_fields = [field.name for field in Image._meta.fields] + ["took", "download"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Image | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Image]:
        return super().get_queryset(request).defer("thumbnails")

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Image) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="pixels")
    def pixels(self, obj: Image) -> str:
        return f"{obj.width}×{obj.height}" if obj.width else "—"

    @admin.display(description="sizes")
    def sizes_made(self, obj: Image) -> str:
        return ", ".join(obj.sizes)

    @admin.display(description="archive", ordering="archive_size")
    def archive_size_display(self, obj: Image) -> str:
        return filesizeformat(obj.archive_size) if obj.archive_size else "—"

    @admin.display(description="took")
    def took(self, obj: Image) -> str:
        return seconds(obj.duration)

    @admin.display(description="schedule", ordering="sweep__schedule_name")
    def schedule(self, obj: Image) -> str:
        return obj.sweep.schedule_name if obj.sweep else obj.get_source_display()

    @admin.display(description="zip")
    def download(self, obj: Image) -> str:
        if obj.status != Image.Status.DONE:
            return "—"
        return format_html('<a href="{}">download</a>', reverse("jobs:archive", args=[obj.id]))

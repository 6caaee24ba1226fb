"""The admin tells the story: which sweep found what, and what became of every image.

Also the control room: sweep a folder now, reprocess or retry images, manage the periodic
sweeps through a form, and the dashboard (wired in project/urls.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import uuid4

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django_celery_beat.admin import PeriodicTaskAdmin as BasePeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask, PeriodicTasks
from django_celery_results.models import TaskResult

from . import beat, intake, stats, storage, views
from .forms import SizesForm, SweepNowForm, SweepTaskForm, default_sizes
from .models import Image, ScheduleActivity, Sweep
from .tasks import SWEEP_TASK, queue_images, sweep_folder

logger = logging.getLogger(__name__)

admin.site.site_header = "Parroter"
admin.site.site_title = "Parroter"
admin.site.index_title = "Thumbnails: review and control"
admin.site.index_template = "admin/jobs/index.html"

STATUS_COLOURS = {
    Image.Status.PENDING: "#6c757d",
    Image.Status.PROCESSING: "#0d6efd",
    Image.Status.DONE: "#198754",
    Image.Status.FAILED: "#dc3545",
    Image.Status.DUPLICATE: "#6f42c1",
    Sweep.Status.RUNNING: "#0d6efd",
    Sweep.Status.SKIPPED: "#6c757d",
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
    class Media:
        css = {"all": ["jobs/admin.css"]}


class RecordAdminMixin(ParroterAdminMixin):
    """Sweeps and images are records of what happened: shown, never added or edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


# --- Sweeps -------------------------------------------------------------------------------


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
    list_filter = [OutcomeFilter, "status", "trigger", "schedule_name", "started_at"]
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
                    "folder",
                    "sizes",
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
    readonly_fields = [name for _, section in fieldsets for name in section["fields"]]

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Sweep) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="took")
    def took(self, obj: Sweep) -> str:
        return seconds(obj.duration)

    @admin.display(description="output options")
    def output_options(self, obj: Sweep) -> str:
        return options_text(obj.options)

    @admin.display(description="images")
    def images_link(self, obj: Sweep) -> str:
        url = reverse("admin:jobs_image_changelist") + f"?sweep__id__exact={obj.id}"
        return format_html('<a href="{}">{} claimed</a>', url, obj.claimed)

    @admin.display(description="error")
    def short_error(self, obj: Sweep) -> str:
        return obj.error[:120]

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
        names = (
            Sweep.objects.exclude(schedule_name="")
            .order_by("schedule_name")
            .values_list("schedule_name", flat=True)
            .distinct()
        )
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


@admin.register(Image)
class ImageAdmin(RecordAdminMixin, admin.ModelAdmin):
    list_display = [
        "preview",
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
    list_display_links = ["preview", "name"]
    list_filter = ["status", ScheduleFilter, "source", "finished_at", "format"]
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
                    "name",
                    "source",
                    "uploaded_by",
                    "folder",
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
        ("Files", {"fields": ["source_path", "original_path", "archive"]}),
    ]
    # Nothing here is edited by hand: every field shown is read-only.
    readonly_fields = [name for _, section in fieldsets for name in section["fields"]]

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("jobs.reprocess_image")

    def get_fieldsets(self, request: HttpRequest, obj: Image | None = None) -> list:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.error:
            return fieldsets
        return [fieldset for fieldset in fieldsets if fieldset[0] != "Failure"]

    # --- columns and fields

    @admin.display(description="")
    def preview(self, obj: Image) -> str:
        url = views.preview_url(obj)
        if url is None:
            return format_html('<span class="parroter-nopreview">{}</span>', "no preview")
        return format_html(
            '<img class="parroter-preview" src="{}" alt="" loading="lazy" width="64">', url
        )

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Image) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="pixels")
    def pixels(self, obj: Image) -> str:
        return f"{obj.width}×{obj.height}" if obj.width else "—"

    @admin.display(description="sizes")
    def sizes_made(self, obj: Image) -> str:
        holder = views.archive_holder(obj)
        made = holder.thumbnails if holder else {}
        if not made:
            return format_html('<span class="parroter-muted">{}</span>', ", ".join(obj.sizes))
        return ", ".join(f"{width}×{height}" for _, width, height in views.sorted_thumbnails(made))

    @admin.display(description="sizes asked")
    def sizes_asked(self, obj: Image) -> str:
        return ", ".join(obj.sizes) or "—"

    @admin.display(description="output options")
    def output_options(self, obj: Image) -> str:
        return options_text(obj.options)

    @admin.display(description="archive", ordering="archive_size")
    def archive_size_display(self, obj: Image) -> str:
        holder = views.archive_holder(obj)
        if holder is None or not holder.archive_size:
            return "—"
        return filesizeformat(holder.archive_size)

    @admin.display(description="file size", ordering="file_size")
    def file_size_display(self, obj: Image) -> str:
        return filesizeformat(obj.file_size)

    @admin.display(description="took")
    def took(self, obj: Image) -> str:
        return seconds(obj.duration)

    @admin.display(description="schedule", ordering="sweep__schedule_name")
    def schedule(self, obj: Image) -> str:
        if obj.sweep and obj.sweep.schedule_name:
            return obj.sweep.schedule_name
        if obj.source == Image.Source.UPLOAD:
            return "upload"
        return "sweep now" if obj.sweep else "—"

    @admin.display(description="zip")
    def download(self, obj: Image) -> str:
        if views.archive_holder(obj) is None:
            return "—"
        return format_html('<a href="{}">download</a>', reverse("jobs:archive", args=[obj.id]))

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
        holder = views.archive_holder(obj)
        if holder is None or not holder.thumbnails:
            return "—"
        return format_html(
            '<div class="parroter-gallery">{}</div>',
            format_html_join(
                "",
                '<figure><img src="{}" width="{}" height="{}" alt="{}">'
                "<figcaption>{} → {}×{}</figcaption></figure>",
                (
                    (views.thumbnail_url(obj, label), width, height, label, label, width, height)
                    for label, width, height in views.sorted_thumbnails(holder.thumbnails)
                ),
            ),
        )

    @admin.display(description="zip contents")
    def zip_contents(self, obj: Image) -> str:
        listing = views.zip_listing(obj)
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
        if views.archive_holder(obj) is None:
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

    def requeue(self, request: HttpRequest, images: list[Image], sizes: list[str] | None) -> None:
        result = intake.claim_again(images, sizes)
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
            form = SizesForm(request.POST)
            if form.is_valid() and images:
                self.requeue(request, images, form.cleaned_data["sizes"])
                url = reverse("admin:jobs_image_changelist")
                if len(images) == 1:
                    url = reverse("admin:jobs_image_change", args=[images[0].id])
                return HttpResponseRedirect(url)
        else:
            current = {image.sizes_key for image in images}
            sizes = images[0].sizes if len(current) == 1 else settings.THUMBNAIL_SIZES
            form = SizesForm(initial={"sizes": ", ".join(sizes)})
        context = {
            **self.admin_site.each_context(request),
            "title": "Reprocess images",
            "opts": self.opts,
            "form": form,
            "images": [(image, intake.why_not_reprocess(image)) for image in images],
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
            used = intake.duplicates_using(final)
            for image in final.filter(id__in=list(used)).only("id", "name"):
                self.message_user(
                    request,
                    f"{image.name} (#{image.id}) was kept: "
                    f"{intake.duplicates_reason(used[image.id])}; "
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
    list_display = [
        "name",
        "owner",
        "enabled",
        "schedule_display",
        "sweeps",
        "next_run",
        "last_sweep",
        "idle_sweeps",
    ]
    list_filter = ["enabled", OwnerFilter, "task"]
    fieldsets = [
        (None, {"fields": ["name", "regtask", "task", "enabled", "description"]}),
        (
            "Sweep: what and where",
            {
                "fields": ["folder", "sizes", "quality"],
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
                    "crontab_translation",
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
        sizes = kwargs.get("sizes")
        sizes_text = ", ".join(sizes) if isinstance(sizes, list) else (sizes or "default sizes")
        if kwargs.get("quality") is not None:
            sizes_text += f"; quality {kwargs['quality']}"
        return format_html(
            "<code>{}</code><br><small>{}</small>",
            kwargs.get("folder") or settings.WATCH_FOLDER,
            sizes_text,
        )

    @admin.display(description=f"next run ({settings.TIME_ZONE})")
    def next_run(self, obj: PeriodicTask) -> Any:
        when = beat.next_run(obj)
        if when is None:
            return "—" if obj.enabled else "disabled"
        return date_format(timezone.localtime(when), "j M H:i:s")

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
        detail = error[:100] if error else f"{claimed} claimed"
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
        "queue": stats.queue_length(),
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

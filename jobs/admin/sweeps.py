"""Sweeps in the admin: what each found, and "sweep a folder now" with its progress page.

The filters list the schedules that sent a recorded sweep (idle scheduled sweeps leave no
record: their schedule counts them) and a sweep's outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import uuid4

import kombu.exceptions
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django_celery_beat.models import PeriodicTask

from .. import beat
from ..forms import SweepNowForm, default_sizes
from ..links import sweep_images_url
from ..models import Sweep
from ..tasks import SWEEP_TASK, sweep_folder
from .display import (
    GroupedFacetsFilter,
    RecordAdminMixin,
    badge,
    options_text,
    seconds,
    shortened,
    sizes_text,
    task_result_link,
    when_and_took,
    wrap_path,
)


def schedule_names() -> list[str]:
    """Names of the periodic tasks that sent a recorded sweep, for the schedule filters."""
    return list(
        Sweep.objects.exclude(schedule_name="")
        .order_by("schedule_name")
        .values_list("schedule_name", flat=True)
        .distinct()
    )


class SweepScheduleFilter(GroupedFacetsFilter):
    """The periodic task that sent a sweep (sweeps of no schedule are under "trigger")."""

    title = "schedule"
    parameter_name = "schedule_name"
    facet_fields = ("schedule_name",)

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        names = schedule_names()
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Sweep]) -> QuerySet[Sweep]:
        return queryset.filter(schedule_name=self.value()) if self.value() else queryset

    def facet_choices(self, row: tuple) -> Iterable[str]:
        return [row[0]]


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
        return when_and_took(obj.started_at, obj.duration)

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
                try:
                    sweep_folder.apply_async(
                        kwargs={"folder": data["folder"], "sizes": data["sizes"]}, task_id=task_id
                    )
                except kombu.exceptions.OperationalError as exc:
                    form.add_error(
                        None,
                        f"The broker does not answer ({exc}): no sweep was sent. "
                        "Try again once it is back.",
                    )
                else:
                    return HttpResponseRedirect(
                        reverse("admin:jobs_sweep_progress", args=[task_id])
                    )
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
        folder = beat.named_folder(task)
        if folder is not None and folder not in folders:
            folders.append(folder)
    return folders

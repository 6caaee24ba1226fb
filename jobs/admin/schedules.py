"""Periodic tasks in the admin: a form of sweep fields, and settings-defined rows read-only.

Beat writes the rows named in CELERY_BEAT_SCHEDULE again on every start, so those are shown
but neither edited nor deleted here (`beat.is_settings_owned`); each row shows its next run,
its last recorded sweep and how many sweeps found nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django_celery_beat.admin import PeriodicTaskAdmin as BasePeriodicTaskAdmin
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks

from .. import beat
from ..forms import SweepTaskForm
from ..models import ScheduleActivity, Sweep
from ..sweeper import PRESET_CHOICES, scheduled_folders
from ..tasks import SWEEP_TASK
from .display import ParroterAdminMixin, badge, shortened, sizes_text, when, wrap_path


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

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        """django-celery-beat's actions declare no permission, so Django offers them to
        anyone who may view the list: switching tasks on and off is changing them, and
        running one now (a sweep, retention) is at least sweeping a folder now."""
        actions = super().get_actions(request)
        if not self.has_change_permission(request):
            for name in ("enable_tasks", "disable_tasks", "toggle_tasks", "run_tasks"):
                actions.pop(name, None)
        if not request.user.has_perm("jobs.sweep_now"):
            actions.pop("run_tasks", None)
        return actions

    @admin.action(description="Enable selected tasks")
    def enable_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        super().enable_tasks(request, self.without_clashes(request, queryset))

    @admin.action(description="Toggle activity of selected tasks")
    def toggle_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        # Those switched off here free their folders: toggling two schedules of one folder
        # swaps them.
        switched_off = list(queryset.filter(enabled=True).values_list("pk", flat=True))
        kept = self.without_clashes(request, queryset.filter(enabled=False), switched_off)
        super().toggle_tasks(request, queryset.filter(Q(enabled=True) | Q(pk__in=kept)))

    @admin.action(description="Run selected tasks")
    def run_tasks(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        """Send each now, as asked for by hand: without the schedule's name, which would
        make a sweep that finds nothing a scheduled one, counted as idle and not recorded
        (a sweep someone asked for is always recorded)."""
        self.celery_app.loader.import_default_modules()
        sent = 0
        for task in queryset:
            runnable = self.celery_app.tasks.get(task.task)
            try:
                args, kwargs = json.loads(task.args or "[]"), json.loads(task.kwargs or "{}")
            except ValueError:
                runnable = None
            if runnable is None:
                self.message_user(
                    request,
                    f"“{task.name}” was not run: its task {task.task!r} is unknown, or its "
                    "arguments are not JSON",
                    messages.ERROR,
                )
                continue
            runnable.apply_async(
                args=args, kwargs=kwargs, **({"queue": task.queue} if task.queue else {})
            )
            sent += 1
        if sent:
            self.message_user(request, f"{sent} task(s) sent to run now.")

    def without_clashes(
        self,
        request: HttpRequest,
        queryset: QuerySet[PeriodicTask],
        switched_off: Iterable[int] = (),
    ) -> QuerySet[PeriodicTask]:
        """`queryset` less the disabled sweeps that enabling would set racing another for
        its folder (an enabled one not being `switched_off`, or one enabled before it in
        this selection): the rule the change form keeps. Each one left out is named in a
        warning."""
        taken = scheduled_folders(exclude=switched_off)
        refused = []
        for task in queryset.filter(enabled=False, task=SWEEP_TASK).order_by("pk"):
            folder = beat.named_folder(task)
            if folder is None:
                continue
            path = Path(folder).resolve()
            if path in taken:
                refused.append(task.pk)
                self.message_user(
                    request,
                    f"“{task.name}” was left disabled: {path} is already swept by "
                    f"“{taken[path]}” (two schedules would race for the same files).",
                    messages.WARNING,
                )
            else:
                taken[path] = task.name
        return queryset.exclude(pk__in=refused)

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
        if hasattr(obj, "last_sweep_id"):
            sweep_id, status = obj.last_sweep_id, obj.last_sweep_status
            claimed, error = obj.last_sweep_claimed, obj.last_sweep_error
        else:
            last = Sweep.objects.filter(schedule_name=obj.name).first()
            sweep_id, status, claimed, error = (
                (last.id, last.status, last.claimed, last.error) if last else (None, "", 0, "")
            )
        if sweep_id is None:
            return "—"
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

"""Celery's task results in the admin, with their arguments and results readable.

django-celery-results stores arguments as JSON holding Celery's repr of them; they are read
back as Python literals only, never run.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django_celery_results.admin import TaskResultAdmin as BaseTaskResultAdmin
from django_celery_results.models import TaskResult

from .display import GroupedFacetsFilter, RecordAdminMixin, badge, value_text, when

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


def values_table(rows: Iterable[tuple[Any, Any]]) -> str:
    """(name, value) pairs as a table of two columns, each value readable."""
    return format_html(
        '<table class="parroter-args"><tbody>{}</tbody></table>',
        format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td></tr>",
            ((name, value_text(value)) for name, value in rows),
        ),
    )


class PeriodicTaskNameFilter(GroupedFacetsFilter):
    title = "periodic task"
    parameter_name = "periodic_task"
    facet_fields = ("periodic_task_name",)

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

    def facet_choices(self, row: tuple) -> Iterable[str]:
        return [f"task:{row[0]}" if row[0] else "none"]


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
        return values_table(rows)

    @admin.display(description="result")
    def result_display(self, obj: TaskResult) -> str:
        result = stored_value(obj.result)
        if result is None:
            return "—"
        if isinstance(result, dict):
            return values_table(result.items())
        return value_text(result)

"""The dashboard: how the system is doing, at a glance (staff with the view permission).

Wired in project/urls.py under the name "dashboard", beside the admin's own URLs; its figures
come from `stats` and `broker`.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from .. import broker, stats
from ..models import Image
from .sweeps import can_sweep_now


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

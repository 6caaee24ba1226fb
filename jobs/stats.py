"""How the system is doing, for the dashboard: read-only queries and a server-side SVG chart."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import Count, Exists, F, Max, Min, OuterRef, Q, Subquery, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from . import storage
from .models import Image, ScheduleActivity, Sweep
from .sweeper import SWEEP_TASK

logger = logging.getLogger(__name__)

CHART_WIDTH = 960
CHART_HEIGHT = 240
CHART_LEFT = 40
CHART_BOTTOM = 28
CHART_TOP = 12


@dataclass
class Bar:
    x: float
    width: float
    done_y: float
    done_height: float
    failed_y: float
    failed_height: float
    title: str


@dataclass
class Chart:
    """Images finished per hour (done and failed stacked), laid out for an SVG template."""

    width: int
    height: int
    bars: list[Bar] = field(default_factory=list)
    x_labels: list[tuple[float, str]] = field(default_factory=list)
    y_labels: list[tuple[float, str]] = field(default_factory=list)
    left: int = CHART_LEFT
    bottom: float = 0
    total_done: int = 0
    total_failed: int = 0


@dataclass
class Throughput:
    sweep: Sweep
    images: int
    seconds: float
    megapixels: float

    @property
    def per_minute(self) -> float:
        return self.images * 60 / self.seconds if self.seconds else 0.0

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.seconds if self.seconds else 0.0


def hourly_chart(days: int, now: datetime | None = None) -> Chart:
    """Done and failed images per hour over the last `days` days, in the site's time zone."""
    now = timezone.localtime(now or timezone.now())
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    hours = [end - timedelta(hours=count) for count in range(days * 24, 0, -1)]
    counts: dict[datetime, dict[str, int]] = {hour: {"done": 0, "failed": 0} for hour in hours}
    rows = (
        Image.objects.filter(finished_at__gte=hours[0], finished_at__lt=end)
        .annotate(hour=TruncHour("finished_at", tzinfo=timezone.get_current_timezone()))
        .values("hour")
        .annotate(
            done=Count("id", filter=Q(status__in=[Image.Status.DONE, Image.Status.DUPLICATE])),
            failed=Count("id", filter=Q(status=Image.Status.FAILED)),
        )
    )
    for row in rows:
        hour = timezone.localtime(row["hour"])
        if hour in counts:
            counts[hour]["done"] += row["done"]
            counts[hour]["failed"] += row["failed"]
    chart = Chart(width=CHART_WIDTH, height=CHART_HEIGHT)
    plot_width = CHART_WIDTH - CHART_LEFT - 8
    plot_height = CHART_HEIGHT - CHART_BOTTOM - CHART_TOP
    chart.bottom = CHART_TOP + plot_height
    top = max((c["done"] + c["failed"] for c in counts.values()), default=0)
    scale_max = nice_ceiling(top)
    step = plot_width / len(hours)
    for index, hour in enumerate(hours):
        done, failed = counts[hour]["done"], counts[hour]["failed"]
        chart.total_done += done
        chart.total_failed += failed
        done_height = plot_height * done / scale_max
        failed_height = plot_height * failed / scale_max
        x = CHART_LEFT + index * step
        chart.bars.append(
            Bar(
                x=round(x + step * 0.1, 2),
                width=round(max(step * 0.8, 1), 2),
                done_y=round(chart.bottom - done_height, 2),
                done_height=round(done_height, 2),
                failed_y=round(chart.bottom - done_height - failed_height, 2),
                failed_height=round(failed_height, 2),
                title=f"{hour:%a %d %b %H:00}: {done} done, {failed} failed",
            )
        )
        if hour.hour % (6 if days <= 3 else 24) == 0:
            label = f"{hour:%H:%M}" if hour.hour else f"{hour:%d %b}"
            chart.x_labels.append((round(x, 2), label))
    for fraction in (0, 0.5, 1):
        y = chart.bottom - plot_height * fraction
        chart.y_labels.append((round(y, 2), f"{scale_max * fraction:g}"))
    return chart


def nice_ceiling(value: int) -> int:
    """A round number at least `value` (and at least 1) for the top of an axis."""
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if value <= nice:
            return nice
    return int(value * 1.1) + 1


def recent_throughput(limit: int = 10) -> list[Throughput]:
    """Images per minute and megapixels per second of the last sweeps that made something.

    Measured from the sweep's start to its last image's end: what someone waiting sees.
    """
    finished = Q(images__status__in=Image.FINAL_STATUSES)
    # The last sweeps first, then their figures: aggregated before the limit, every sweep
    # of the history would be (a year's took seconds).
    made = Image.objects.filter(sweep=OuterRef("pk"), status__in=Image.FINAL_STATUSES)
    latest = (
        Sweep.objects.filter(Exists(made), claimed__gt=0)
        .order_by("-started_at")
        .values_list("id", flat=True)[:limit]
    )
    sweeps = (
        Sweep.objects.filter(id__in=list(latest))
        .annotate(
            finished_images=Count("images", filter=finished),
            first_start=Min("images__started_at"),
            last_end=Max("images__finished_at", filter=finished),
            pixels=Sum(F("images__width") * F("images__height"), filter=finished),
        )
        .order_by("-started_at")
    )
    result = []
    for sweep in sweeps:
        seconds = (sweep.last_end - sweep.started_at).total_seconds() if sweep.last_end else 0
        result.append(
            Throughput(
                sweep=sweep,
                images=sweep.finished_images,
                seconds=max(seconds, 0.001),
                megapixels=(sweep.pixels or 0) / 1e6,
            )
        )
    return result


def oldest_waiting() -> Image | None:
    """The image that has waited longest for a worker (pending or processing)."""
    return (
        Image.objects.filter(status__in=[Image.Status.PENDING, Image.Status.PROCESSING])
        .order_by("queued_at", "id")
        .only("id", "name", "status", "queued_at", "folder")
        .first()
    )


def status_counts(since: datetime | None = None) -> dict[str, int]:
    images = Image.objects.all()
    if since is not None:
        images = images.filter(queued_at__gte=since)
    counts = dict(images.values_list("status").annotate(n=Count("id")).order_by())
    return {status: counts.get(status, 0) for status in Image.Status.values}


def archive_disk() -> dict[str, int | None]:
    """Bytes of the archives on record, and the space left where MEDIA_ROOT lives."""
    # From the index /metrics reads: archive_size is null whenever there is no archive.
    recorded = Image.objects.aggregate(total=Sum("archive_size"), count=Count("archive_size"))
    free = None
    media = Path(settings.MEDIA_ROOT)
    try:
        free = shutil.disk_usage(media if media.exists() else media.parent).free
    except OSError as exc:
        logger.warning("cannot read free space of %s: %s", media, exc)
    return {"bytes": recorded["total"] or 0, "count": recorded["count"], "free": free}


def schedule_activity() -> list[PeriodicTask]:
    """The sweep schedules and what their sweeps did: when one last ran (on a worker; beat
    writes its own last_run_at only every few minutes), the idle ones counted, and the last
    that found something."""
    activity = ScheduleActivity.objects.filter(schedule_name=OuterRef("name"))
    return list(
        PeriodicTask.objects.filter(task=SWEEP_TASK)
        .annotate(
            idle_sweeps=Subquery(activity.values("idle_sweeps")[:1]),
            last_idle_at=Subquery(activity.values("last_idle_at")[:1]),
            swept_at=Subquery(activity.values("swept_at")[:1]),
            last_found_id=Subquery(activity.values("last_found_id")[:1]),
            last_found_at=Subquery(activity.values("last_found__started_at")[:1]),
        )
        .order_by("name")
        .only("name", "enabled")
    )


@dataclass
class Retention:
    """How long things are kept (0 days: forever), and the free-space floor of sweeps."""

    originals_days: int
    archives_days: int
    results_days: int
    idle_sweep_days: int
    webhook_days: int
    min_free_mb: int
    free_bytes: int | None

    @property
    def low_on_space(self) -> bool:
        return self.free_bytes is not None and self.free_bytes < self.min_free_mb * 1024 * 1024


def retention() -> Retention:
    try:
        _, free = storage.media_free_bytes()
    except OSError:
        free = None
    expires = settings.CELERY_RESULT_EXPIRES
    return Retention(
        originals_days=settings.KEEP_ORIGINALS_DAYS,
        archives_days=settings.KEEP_ARCHIVES_DAYS,
        results_days=expires.days if expires else 0,
        idle_sweep_days=settings.IDLE_SWEEP_DAYS,
        webhook_days=settings.WEBHOOK_KEEP_DAYS,
        min_free_mb=settings.MIN_FREE_MB,
        free_bytes=free,
    )

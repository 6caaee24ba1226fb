"""Prometheus metrics, computed from the database at scrape time.

Why not counters kept in memory: web pages are served by several gunicorn processes and
images by several worker processes, maybe on several hosts; each would count only its own
share, and a restart would lose it. prometheus-client's multiprocess mode fixes the first
for one host only, at the price of a shared directory to clean. The database already holds
every image with its status and timings, so each scrape asks it a handful of aggregate
queries (no rows are loaded) and every process gives the same, complete answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.db.models import Count, DurationField, ExpressionWrapper, F, Max, Min, Q, Sum
from django.utils import timezone
from prometheus_client.core import (
    CollectorRegistry,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import tasks
from .models import Image, Sweep, WebhookDelivery

logger = logging.getLogger(__name__)

# Upper bounds (seconds) of the processing-time histogram: small images take tens of
# milliseconds, large photos a few seconds, the time limit a few minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class DatabaseCollector:
    """Collects every Parroter metric from the database (and the queue from the broker)."""

    def collect(self) -> Iterator[Metric]:
        figures = image_figures()
        yield images_by_status(figures)
        yield processing_seconds(figures)
        yield from queue()
        yield oldest_pending()
        yield last_good_sweeps()
        yield archive_bytes(figures)
        yield webhook_deliveries()


def registry() -> CollectorRegistry:
    """A registry of our metrics only: a web process's own CPU and memory are not the
    system's, and differ between the processes a scrape may reach."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return registry


def image_figures() -> list[dict[str, Any]]:
    """Per status and schedule: images, archive bytes, and the processing-time histogram.

    One query, one pass over the images: every figure about images comes from it.
    """
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    per_bucket = {
        f"le_{index}": Count("id", filter=Q(duration__lte=timedelta(seconds=bound)))
        for index, bound in enumerate(BUCKETS)
    }
    return list(
        Image.objects.alias(duration=duration)
        .values("status", "sweep__schedule_name")
        .annotate(
            count=Count("id"),
            archive_bytes=Sum("archive_size", filter=~Q(archive="")),
            # A row without both times has a NULL duration, which no filter counts.
            timed=Count("duration"),
            seconds=Sum("duration"),
            **per_bucket,
        )
        .order_by()
    )


def images_by_status(figures: list[dict[str, Any]]) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(
        "parroter_images_total",
        "Images on record by status and by the schedule that swept them (empty: uploads "
        "and manual sweeps). A gauge: deleting or reprocessing images lowers it.",
        labels=["status", "schedule"],
    )
    counts: dict[tuple[str, str], int] = dict.fromkeys(
        ((status, "") for status in Image.Status.values), 0
    )
    for row in figures:
        key = (row["status"], row["sweep__schedule_name"] or "")
        counts[key] = counts.get(key, 0) + row["count"]
    for (status, schedule), count in sorted(counts.items()):
        metric.add_metric([status, schedule], count)
    return metric


def processing_seconds(figures: list[dict[str, Any]]) -> HistogramMetricFamily:
    metric = HistogramMetricFamily(
        "parroter_image_processing_seconds",
        "Time from the start of an image's last run to its final state.",
        labels=["status"],
    )
    for status in Image.FINAL_STATUSES:
        rows = [row for row in figures if row["status"] == status]
        buckets = [
            (floatToGoString(bound), sum(row[f"le_{index}"] for row in rows))
            for index, bound in enumerate(BUCKETS)
        ]
        buckets.append(("+Inf", sum(row["timed"] for row in rows)))
        seconds = sum((row["seconds"] or timedelta(0) for row in rows), timedelta(0))
        metric.add_metric([status], buckets, seconds.total_seconds())
    return metric


def queue() -> Iterator[GaugeMetricFamily]:
    length = tasks.queue_length()
    if length is None:
        return  # the broker did not answer; a missing sample says so, a 0 would lie
    metric = GaugeMetricFamily(
        "parroter_queue_messages", "Image messages waiting in the broker queue."
    )
    metric.add_metric([], length)
    yield metric


def oldest_pending() -> GaugeMetricFamily:
    metric = GaugeMetricFamily(
        "parroter_oldest_pending_seconds",
        "How long the longest-waiting pending image has waited (0 when none waits).",
    )
    oldest = Image.objects.filter(status=Image.Status.PENDING).aggregate(at=Min("queued_at"))["at"]
    age = (timezone.now() - oldest).total_seconds() if oldest else 0.0
    metric.add_metric([], max(age, 0.0))
    return metric


def last_good_sweeps() -> GaugeMetricFamily:
    metric = GaugeMetricFamily(
        "parroter_last_good_sweep_timestamp_seconds",
        "When the last sweep of each schedule finished without failing (Unix time).",
        labels=["schedule"],
    )
    rows = (
        Sweep.objects.filter(status=Sweep.Status.DONE, finished_at__isnull=False)
        .exclude(schedule_name="")
        .values_list("schedule_name")
        .annotate(last=Max("finished_at"))
        .order_by()
    )
    for schedule, last in rows:
        metric.add_metric([schedule], last.timestamp())
    return metric


def archive_bytes(figures: list[dict[str, Any]]) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(
        "parroter_archive_bytes", "Bytes of the archives on record (under MEDIA_ROOT)."
    )
    metric.add_metric([], sum(row["archive_bytes"] or 0 for row in figures))
    return metric


def webhook_deliveries() -> GaugeMetricFamily:
    metric = GaugeMetricFamily(
        "parroter_webhook_deliveries", "Webhook deliveries on record by status.", labels=["status"]
    )
    counts = dict(
        WebhookDelivery.objects.values_list("status").annotate(count=Count("id")).order_by()
    )
    for status in WebhookDelivery.Status.values:
        metric.add_metric([status], counts.get(status, 0))
    return metric

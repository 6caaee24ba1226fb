"""Thin Celery tasks. Their names are stable: admin-made periodic tasks store them as strings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django_celery_beat.models import PeriodicTask

from . import processing, webhooks
from .broker import queue_length
from .models import Sweep
from .sweep import prune_idle_sweeps, recover_unswept, run_sweep, start_sweep

logger = logging.getLogger(__name__)

SWEEP_TASK = "jobs.sweep_folder"
# Seconds a just-queued message may spend in a worker's prefetch, outside the queue list.
LOST_QUEUE_GRACE = 5
# Messages sent to Redis per round trip when many images are queued at once.
QUEUE_BATCH = 500


class SweepArgumentsError(ValueError):
    """A sweep was sent arguments it cannot use (a periodic task's kwargs edited by hand)."""


@shared_task(bind=True, name=SWEEP_TASK)
def sweep_folder(
    self,
    folder: str | None = None,
    sizes: list[str] | str | None = None,
    quality: int | None = None,
    **unknown: object,
) -> dict[str, object]:
    """Sweep one folder: repair leftovers, claim ready files, queue one task per image.

    `quality` is the JPEG/WebP thumbnail quality (None: JPEG_QUALITY); the output preset
    comes as `format`, `fit`, `gravity`, `metadata`, `gps` and `colour` (see
    sweep.resolve_options; left out: the settings' THUMBNAIL_* defaults). Unknown keyword
    arguments (a periodic task's kwargs edited by hand) fail the sweep with a recorded
    reason, rather than a TypeError that leaves no sweep behind.
    """
    schedule_name = getattr(self.request, "periodic_task_name", None) or ""
    sweep, to_queue = sweep_now(
        folder,
        sizes,
        trigger=Sweep.Trigger.SCHEDULE if schedule_name else Sweep.Trigger.MANUAL,
        schedule_name=schedule_name,
        task_id=self.request.id or "",
        options={"quality": quality, **unknown},
    )
    transaction.on_commit(lambda: queue_images(to_queue))
    return {
        "sweep": sweep.id,
        "status": sweep.status,
        "claimed": sweep.claimed,
        "requeued": sweep.requeued,
        "unstable": sweep.unstable,
    }


def sweep_now(
    folder: str | None,
    sizes: list[str] | str | None,
    *,
    trigger: str,
    schedule_name: str = "",
    task_id: str = "",
    options: Mapping[str, object] | None = None,
) -> tuple[Sweep, list[int]]:
    """Record and run one sweep; returns it and the image ids to queue (not yet queued).

    Raises SweepArgumentsError, after recording the failed sweep, if the folder, sizes or
    output options cannot be used.
    """
    sweep, path, labels = start_sweep(
        folder,
        sizes,
        trigger=trigger,
        schedule_name=schedule_name,
        task_id=task_id,
        options=options,
    )
    if path is None:
        raise SweepArgumentsError(sweep.error)
    outcome = run_sweep(
        sweep,
        path,
        labels,
        exclude=other_sweep_folders(path),
        # An empty queue while images wait means their messages are gone (Redis restarted
        # without persistence): queue them again now rather than after REQUEUE_AFTER.
        requeue_after=LOST_QUEUE_GRACE if queue_length() == 0 else None,
    )
    return sweep, outcome.to_queue


@shared_task(name="jobs.recover")
def recover() -> dict[str, int]:
    """Repair uploads and reprocessed images that a dead worker or a lost message left.

    Also forgets idle sweeps older than IDLE_SWEEP_DAYS.
    """
    image_ids = recover_unswept(LOST_QUEUE_GRACE if queue_length() == 0 else None)
    transaction.on_commit(lambda: queue_images(image_ids))
    pruned = prune_idle_sweeps(timedelta(days=settings.IDLE_SWEEP_DAYS))
    return {"requeued": len(image_ids), "idle_sweeps_pruned": pruned}


@shared_task(
    bind=True,
    name="jobs.make_thumbnails",
    soft_time_limit=settings.IMAGE_SOFT_TIME_LIMIT,
    time_limit=settings.IMAGE_TIME_LIMIT,
)
def make_thumbnails(self, image_id: int) -> str:
    """Turn one claimed image into its zip; idempotent, so a redelivery does no harm."""
    return processing.process_image(
        int(image_id),
        task_id=self.request.id or "",
        time_limit_errors=(SoftTimeLimitExceeded,),
    )


def queue_images(image_ids: Iterable[int]) -> None:
    """Send one message per image over a single broker connection, pipelined.

    kombu's publish batch sends up to QUEUE_BATCH messages in one Redis round trip instead
    of one each. A batch that fails is not replayed (delivery uncertain): a message is only
    a nudge, and a sweep queues again whatever stays pending (REQUEUE_AFTER).
    """
    image_ids = list(image_ids)
    if not image_ids:
        return
    with make_thumbnails.app.producer_or_acquire() as producer, producer.batch(QUEUE_BATCH):
        for image_id in image_ids:
            make_thumbnails.apply_async((image_id,), producer=producer)
    logger.info("queued %d image(s)", len(image_ids))


def other_sweep_folders(folder: Path) -> list[Path]:
    """Folders below `folder` that an enabled periodic sweep of their own looks after."""
    nested = []
    for raw in PeriodicTask.objects.filter(task=SWEEP_TASK, enabled=True).values_list(
        "kwargs", flat=True
    ):
        try:
            other = json.loads(raw or "{}").get("folder")
        except (ValueError, AttributeError):
            continue
        if isinstance(other, str) and other:
            other_path = Path(other).resolve()
            if other_path != folder and other_path.is_relative_to(folder):
                nested.append(other_path)
    return nested


# Webhook tasks keep no result: each delivery is recorded on its own row (WebhookDelivery).
@shared_task(
    name=webhooks.DELIVER_TASK,
    ignore_result=True,
    # A send past this is killed; `repair` sees its process gone and sends the row again.
    time_limit=webhooks.send_time_limit(),
)
def deliver_webhook(delivery_id: int) -> str:
    """POST one recorded webhook; idempotent, since only one run can claim its row."""
    return webhooks.deliver(int(delivery_id))


@shared_task(name="jobs.repair_webhooks", ignore_result=True)
def repair_webhooks() -> int:
    """Queue again the webhooks whose message or worker was lost."""
    return len(webhooks.repair())

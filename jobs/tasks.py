"""Thin Celery tasks. Their names are stable: admin-made periodic tasks store them as strings."""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from typing import Any

from celery import Task, shared_task, states
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction

from . import retention, runner, sweeper, webhooks
from .broker import queue_state
from .storage import Arrival
from .sweeper import SWEEP_TASK

logger = logging.getLogger(__name__)

# Seconds a just-queued message may spend in a worker's prefetch, outside the queue list.
LOST_QUEUE_GRACE = 5
# Messages sent to Redis per round trip when many images are queued at once.
QUEUE_BATCH = 500


# Sweeps and recoveries run every few seconds and nearly always find nothing: they ignore
# their result (a row each would bury the image tasks' results), and a run that did
# something keeps its own (keep_result). Failures are stored all the same.
QUIET = {"ignore_result": True, "store_errors_even_if_ignored": True}


@shared_task(bind=True, name=SWEEP_TASK, **QUIET)
def sweep_folder(
    self: Task,
    folder: str | None = None,
    sizes: list[str] | str | None = None,
    quality: int | None = None,
    arrived: list[list[int]] | None = None,
    **unknown: object,
) -> dict[str, object]:
    """Sweep one folder (jobs.sweeper.sweep_folder), then queue one task per image.

    `quality` is the JPEG/WebP thumbnail quality (None: JPEG_QUALITY); the output preset
    comes as `format`, `fit`, `gravity`, `metadata`, `gps` and `colour` (see
    sweeper.resolve_options; left out: the settings' THUMBNAIL_* defaults). `arrived` is
    sent by the watch: the files just renamed in, which need not settle (storage.Arrival).
    Unknown keyword arguments (a periodic task's kwargs edited by hand) fail the sweep with
    a recorded reason, rather than a TypeError that leaves no sweep behind. An idle sweep
    leaves no task result, as it leaves no sweep record.
    """
    outcome = sweeper.sweep_folder(
        folder,
        sizes,
        schedule_name=getattr(self.request, "periodic_task_name", None) or "",
        task_id=self.request.id or "",
        options={"quality": quality, **unknown},
        requeue=requeue_policy(),
        arrived=Arrival.parse(arrived),
    )
    transaction.on_commit(lambda: queue_images(outcome.to_queue, uploaded=outcome.uploads))
    return keep_result(self, outcome.summary()) if outcome.recorded else outcome.summary()


@shared_task(bind=True, name="jobs.recover", **QUIET)
def recover(self: Task) -> dict[str, int]:
    """Repair uploads and reprocessed images that a dead worker or a lost message left."""
    repairs = sweeper.recover_unswept(requeue_policy())
    transaction.on_commit(lambda: queue_images(repairs.requeue, uploaded=repairs.uploads))
    result = {"requeued": len(repairs.requeue), "settled": repairs.settled}
    return keep_result(self, result) if any(result.values()) else result


@shared_task(bind=True, name="jobs.apply_retention", **QUIET)
def apply_retention(self: Task) -> dict[str, int]:
    """Delete kept originals and archives past their retention (jobs.retention)."""
    result = retention.apply_retention().counts()
    return keep_result(self, result) if any(result.values()) else result


def keep_result(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """Store the result of a run of a quiet task (one that ignores its results).

    The same row Celery would store, with the same extended fields (task name, arguments,
    periodic task); nothing when the task was called directly rather than by a worker.
    """
    if task.request.id and not task.request.called_directly:
        task.backend.store_result(task.request.id, result, states.SUCCESS, request=task.request)
    return result


def requeue_policy() -> sweeper.Requeue:
    """When pending images' messages count as lost, from what the image queue holds now.

    An empty queue while images wait means their messages are gone (Redis restarted
    without persistence): requeue them after a short grace rather than REQUEUE_AFTER. A
    broker that does not answer says nothing: REQUEUE_AFTER alone decides. Messages a worker
    has taken and not acknowledged do not count as held: a worker can drop what it took (a
    known Celery failure after a broker reconnect), and its images must not wait for the
    broker's visibility timeout. The cost is one extra message for an overdue image that a
    worker holds at the moment of a sweep, skipped at once when it comes.
    """
    waiting = queue_state().waiting
    if waiting is None:
        return sweeper.Requeue()
    return sweeper.Requeue(after=LOST_QUEUE_GRACE if waiting == 0 else None, held=waiting)


@shared_task(
    bind=True,
    name="jobs.make_thumbnails",
    soft_time_limit=settings.IMAGE_SOFT_TIME_LIMIT,
    time_limit=settings.IMAGE_TIME_LIMIT,
)
def make_thumbnails(self, image_id: int) -> str:
    """Turn one claimed image into its zip; idempotent, so a redelivery does no harm."""
    return runner.process_image(
        int(image_id),
        task_id=self.request.id or "",
        time_limit_errors=(SoftTimeLimitExceeded,),
    )


def queue_images(image_ids: Iterable[int], *, uploaded: Container[int] = ()) -> None:
    """Send one message per image over a single broker connection, pipelined.

    Images among `uploaded` go to the upload queue, the rest to the image queue (see
    UPLOAD_QUEUE). kombu's publish batch sends up to QUEUE_BATCH messages in one Redis round
    trip instead of one each. A batch that fails is not replayed (delivery uncertain): a
    message is only a nudge, and a sweep queues again whatever stays pending (REQUEUE_AFTER).
    """
    image_ids = list(image_ids)
    if not image_ids:
        return
    with make_thumbnails.app.producer_or_acquire() as producer, producer.batch(QUEUE_BATCH):
        for image_id in image_ids:
            queue = settings.UPLOAD_QUEUE if image_id in uploaded else settings.IMAGE_QUEUE
            make_thumbnails.apply_async((image_id,), producer=producer, queue=queue)
    logger.info("queued %d image(s)", len(image_ids))


# Webhook tasks keep no result: each delivery is recorded on its own row (WebhookDelivery).
@shared_task(
    name=webhooks.DELIVER_TASK,
    ignore_result=True,
    # A send past this is killed; `repair` takes its row back once the claim outlives it.
    time_limit=webhooks.send_time_limit(),
)
def deliver_webhook(delivery_id: int) -> str:
    """POST one recorded webhook; idempotent, since only one run can claim its row."""
    return webhooks.deliver(int(delivery_id))


@shared_task(name="jobs.repair_webhooks", ignore_result=True)
def repair_webhooks() -> int:
    """Queue again the webhooks whose message or worker was lost."""
    return len(webhooks.repair())

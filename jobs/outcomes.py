"""What an image reaching its final state owes, recorded in the transaction that put it there:
its run time counted for /metrics, and its webhooks (jobs/webhooks.py), its sweep's digest
included when it was the sweep's last open image.

One call, `image_finished`, right after each conditional update to done, failed or
duplicate: if that update is rolled back, so is all of this; if it commits, none of it
can be lost.
"""

from __future__ import annotations

from django.db import transaction

from . import webhooks
from .models import Image, ProcessingTime


def image_finished(image: Image) -> None:
    """Call inside the transaction of the final-state update, after the update."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("image_finished must run in the transaction of the final state")
    status, started, finished, sweep_id = (
        Image.objects.filter(id=image.id)
        .values_list("status", "started_at", "finished_at", "sweep_id")
        .get()
    )
    if started is not None and finished is not None:
        ProcessingTime.add(status, max((finished - started).total_seconds(), 0.0))
    webhooks.record(image, webhooks.EVENTS[Image.Status(status)])
    if sweep_id is not None:
        webhooks.record_sweep_finished(sweep_id)

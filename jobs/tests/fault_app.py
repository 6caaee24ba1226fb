"""The project's Celery app with failures injected, for fault tests run in real workers.

PARROTER_FAULT_DELAY: seconds every image waits inside its run, so that a batch is still in
flight when a test kills something. PARROTER_FAULT_POISON: an image whose name contains this
kills its pool process outright, on every attempt, like a file that crashes a decoder.
PARROTER_FAULT_DIE_AFTER: "archive" (the zip is renamed into place, the database not told
yet) or "done" (the database says done, the original not moved yet): the pool process dies
at that point, once per image (markers in PARROTER_FAULT_MARKERS).
PARROTER_FAULT_PAUSE_AT: "claim" (a sweep has listed its folder and is about to claim what
it found), "read" (a run is about to open its file) or "put_away" (the image is final in
the database, its original not moved yet): the first pool process to get there writes
`paused-<stage>` (holding its PID) into PARROTER_FAULT_MARKERS and waits until
`resume-<stage>` appears, so that a test can change the folder, or kill that process, at
exactly that moment.
Two more stages for webhooks with PARROTER_FAULT_DIE_AFTER: "webhook-recorded" (an image's
final state and its webhook rows are committed, no delivery task queued yet) once per image,
and "webhook-claimed" (a delivery row is claimed, nothing sent yet) once per row.
PARROTER_FAULT_NO_ESTIMATE: the pipeline's memory estimate says every image needs nothing,
so that only the OS limit on the pool process stands between an image and the machine.
Not a fault, an observation: PARROTER_FAULT_CONNECTIONS names a file to which every pool
process appends its PID each time it opens a database connection.
"""

import os
import time
from pathlib import Path

from celery.signals import worker_process_init

from project.celery import app


def die_once(stage: str, name: str) -> None:
    if os.environ.get("PARROTER_FAULT_DIE_AFTER") != stage:
        return
    marker = Path(os.environ["PARROTER_FAULT_MARKERS"]) / f"{stage}-{name.replace('/', '_')}"
    if not marker.exists():
        marker.touch()
        os._exit(70)


def pause_once(stage: str) -> None:
    if os.environ.get("PARROTER_FAULT_PAUSE_AT") != stage:
        return
    markers = Path(os.environ["PARROTER_FAULT_MARKERS"])
    try:
        with (markers / f"paused-{stage}").open("x") as marker:  # once, in one pool process
            marker.write(str(os.getpid()))
    except FileExistsError:
        return
    deadline = time.monotonic() + 120
    while not (markers / f"resume-{stage}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@worker_process_init.connect
def inject_faults(**kwargs):
    """Patch each pool process once Django is ready (it is not when this module loads)."""
    global real_write_archive, real_put_original_away, real_claim, real_read_original
    global real_record, real_post, real_mark_done
    from jobs import pipeline, runner, storage, sweeper, webhooks
    from jobs.models import Image

    real_write_archive = pipeline.write_archive
    real_put_original_away = runner.put_original_away
    real_claim = sweeper.claim
    real_read_original = storage.read_original
    real_record = webhooks.record
    real_post = webhooks.post
    real_mark_done = Image.mark_done
    pipeline.write_archive = faulty_write_archive
    runner.put_original_away = faulty_put_original_away
    sweeper.claim = paused_claim
    storage.read_original = paused_read_original
    webhooks.record = faulty_record
    webhooks.post = faulty_post
    Image.mark_done = faulty_mark_done
    if os.environ.get("PARROTER_FAULT_NO_ESTIMATE"):
        pipeline.estimate_memory = lambda *args, **kwargs: pipeline.MemoryEstimate(0, 0, 0)
    if os.environ.get("PARROTER_FAULT_CONNECTIONS"):
        from django.db.backends.signals import connection_created

        connection_created.connect(note_connection, weak=False)


def note_connection(**kwargs):
    with open(os.environ["PARROTER_FAULT_CONNECTIONS"], "a") as log:
        log.write(f"{os.getpid()}\n")


def paused_claim(sweep, ready, *args, **kwargs):
    if ready:
        pause_once("claim")
    return real_claim(sweep, ready, *args, **kwargs)


def paused_read_original(*args, **kwargs):
    pause_once("read")
    return real_read_original(*args, **kwargs)


def faulty_write_archive(data, original_name, *args, **kwargs):
    time.sleep(float(os.environ.get("PARROTER_FAULT_DELAY", "0")))
    poison = os.environ.get("PARROTER_FAULT_POISON")
    if poison and poison in original_name:
        os._exit(70)
    return real_write_archive(data, original_name, *args, **kwargs)


def faulty_mark_done(image, **result):
    # The zip is renamed into place by now (write_archive returns inside atomic_file).
    die_once("archive", image.name)
    return real_mark_done(image, **result)


def faulty_put_original_away(image):
    pause_once("put_away")
    if image.status == "done":
        die_once("done", image.name)
    return real_put_original_away(image)


def faulty_record(image, event):
    from django.db import transaction

    # Registered before the real record's own callback, so it runs first after the commit.
    transaction.on_commit(lambda: die_once("webhook-recorded", image.name))
    return real_record(image, event)


def faulty_post(url, body, delivery):
    die_once("webhook-claimed", f"delivery-{delivery.id}")
    return real_post(url, body, delivery)


__all__ = ["app"]

"""The project's Celery app with failures injected, for fault tests run in real workers.

PARROTER_FAULT_DELAY: seconds every image waits inside its run, so that a batch is still in
flight when a test kills something. PARROTER_FAULT_POISON: an image whose name contains this
kills its pool process outright, on every attempt, like a file that crashes a decoder.
PARROTER_FAULT_DIE_AFTER: "archive" (the zip is renamed into place, the database not told
yet) or "done" (the database says done, the original not moved yet): the pool process dies
at that point, once per image (markers in PARROTER_FAULT_MARKERS).
PARROTER_FAULT_NO_ESTIMATE: the pipeline's memory estimate says every image needs nothing,
so that only the OS limit on the pool process stands between an image and the machine.
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


@worker_process_init.connect
def inject_faults(**kwargs):
    """Patch each pool process once Django is ready (it is not when this module loads)."""
    global real_write_archive, real_put_original_away
    from jobs import pipeline, processing

    real_write_archive = pipeline.write_archive
    real_put_original_away = processing.put_original_away
    pipeline.write_archive = faulty_write_archive
    processing.put_original_away = faulty_put_original_away
    if os.environ.get("PARROTER_FAULT_NO_ESTIMATE"):
        pipeline.estimate_memory = lambda *args, **kwargs: pipeline.MemoryEstimate(0, 0, 0)


def faulty_write_archive(data, original_name, *args, **kwargs):
    time.sleep(float(os.environ.get("PARROTER_FAULT_DELAY", "0")))
    poison = os.environ.get("PARROTER_FAULT_POISON")
    if poison and poison in original_name:
        os._exit(70)
    info = real_write_archive(data, original_name, *args, **kwargs)
    die_once("archive", original_name)
    return info


def faulty_put_original_away(image):
    if image.status == "done":
        die_once("done", image.name)
    return real_put_original_away(image)


__all__ = ["app"]

"""The project's Celery app with failures injected, for fault tests run in real workers.

PARROTER_FAULT_DELAY: seconds every image waits inside its run, so that a batch is still in
flight when a test kills something. PARROTER_FAULT_POISON: an image whose name contains this
kills its pool process outright, on every attempt, like a file that crashes a decoder.
"""

import os
import time

from jobs import pipeline
from project.celery import app

real_build_archive = pipeline.build_archive


def faulty_build_archive(data, original_name, *args, **kwargs):
    time.sleep(float(os.environ.get("PARROTER_FAULT_DELAY", "0")))
    poison = os.environ.get("PARROTER_FAULT_POISON")
    if poison and poison in original_name:
        os._exit(70)
    return real_build_archive(data, original_name, *args, **kwargs)


pipeline.build_archive = faulty_build_archive

__all__ = ["app"]

"""What each Celery pool process sets up for itself: the memory budget it works within,
and database connections kept from one task to the next.

The pipeline refuses, from its header, an image whose decode and thumbnails would not fit
WORKER_MEMORY_MB (`pipeline.estimate_memory`). Here the kernel backs that estimate: every
pool process gets an RLIMIT_DATA, so that an allocation past the budget fails with
MemoryError, recorded as that image's failure, instead of growing until the machine's OOM
killer picks a victim.

RLIMIT_DATA rather than RLIMIT_AS: since Linux 4.7 it counts the heap and every private
writable mapping, which is where Pillow's pixels and Python's objects live, and leaves out
what is not memory in use: the libraries' code and address space merely reserved
(PROT_NONE, as glibc reserves 64 MB per malloc arena). Measured in a pool process of this
project (Python 3.11, Django, Celery, Pillow): VmData 65 MB against 64 MB of anonymous
resident memory, so the data limit tracks what it limits; the libraries' resident pages
(RssFile, 4-15 MB) are kept out of the limit, with room to grow, so that resident memory
as a whole stays under the budget.
"""

from __future__ import annotations

import ctypes
import io
import logging
import resource
from pathlib import Path

from celery import Task
from celery.signals import task_postrun, task_prerun, worker_process_init
from django.conf import settings
from django.db import close_old_connections
from PIL import Image

from . import pipeline

logger = logging.getLogger(__name__)

# glibc's mallopt() parameter number for M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
# Blocks from this size up (Pillow allocates pixels in blocks of up to 16 MB) get mappings
# of their own, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
# Room under the budget for library code paged in after start-up (an encoder or decoder
# first used later): the pipeline's estimates carry the same slack.
FILE_PAGES_HEADROOM = pipeline.MEMORY_SLACK
# Formats whose libraries are loaded and run once at start-up, so that their code is
# resident, and counted, before the limit is set.
_WARM_UP_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")


@worker_process_init.connect
def limit_pool_process(**kwargs: object) -> None:
    limit_memory(settings.WORKER_MEMORY_MB * pipeline.MiB)


@task_prerun.connect
@task_postrun.connect
def keep_database_connections(sender: Task | None = None, **kwargs: object) -> None:
    """Around each task, what Django does around each request: close a connection that
    broke or outlived CONN_MAX_AGE, keep the others for the next task.

    Celery's own default closes them all after every task (see CELERY_DB_REUSE_MAX), and
    each task then opens a new one: measured, 0.8 ms CPU on SQLite and 6.5 ms on
    PostgreSQL, where a server process is started for each. A task run in the caller's
    process (eager) leaves the caller's connection, maybe in a transaction, alone.
    """
    if sender is not None and getattr(sender.request, "is_eager", False):
        return
    close_old_connections()


def limit_memory(budget: int) -> int:
    """Keep this process's resident memory within `budget` bytes; returns the data limit set."""
    _return_freed_blocks()
    _warm_up_codecs()
    file_pages = _status_bytes("RssFile") + _status_bytes("RssShmem")
    limit = budget - file_pages - FILE_PAGES_HEADROOM
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    held = _status_bytes("VmData")
    if limit <= held:
        logger.error(
            "WORKER_MEMORY_MB=%d leaves this pool process no memory to work with "
            "(it holds %d MB already); every image will fail",
            budget // pipeline.MiB,
            held // pipeline.MiB,
        )
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (max(limit, held), hard))
    except (ValueError, OSError):
        logger.warning("cannot limit this pool process's data; only the estimate applies")
        return limit
    logger.info(
        "pool process memory budget %d MB (WORKER_MEMORY_MB): data limited to %d MB, "
        "%d MB of it in use",
        budget // pipeline.MiB,
        limit // pipeline.MiB,
        held // pipeline.MiB,
    )
    return limit


def _return_freed_blocks() -> None:
    """Make glibc give large freed blocks back to the system at once.

    By default glibc raises its mmap threshold as large blocks are freed, after which freed
    pixels stay in the heap: measured, a process kept 140 MB of data (and, until trimmed,
    resident memory) after one 48 MP 16-bit PNG, which would count against the budget of
    every image after it. A fixed threshold cost no measurable time on the bench corpus
    (1.28 against 1.25 CPU s a pass, within the run-to-run noise).
    """
    try:
        # The symbols of the process itself, the C library's among them.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.info("no mallopt() in this C library; freed memory may stay in the heap")
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _warm_up_codecs() -> None:
    """Encode and decode a tiny image in every supported format once, and through libvips
    when it decodes (LIBVIPS_DECODE)."""
    for image_format in _WARM_UP_FORMATS:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, image_format)
        with Image.open(buffer, formats=pipeline.SUPPORTED_FORMATS) as image:
            image.load()
    if settings.LIBVIPS_DECODE:
        pipeline.warm_up_libvips()


def _status_bytes(key: str) -> int:
    """A figure of /proc/self/status in bytes; 0 where it is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    return 0

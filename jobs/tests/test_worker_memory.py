"""WORKER_MEMORY_MB with real worker processes: files small on disk and big decoded, with
thumbnails up to 3840 px, never take a worker process over its budget.

Every worker process's peak resident memory is read twice: sampled from /proc/<pid>/status
(VmHWM) while the files go through, and, once the worker has stopped, as the kernel kept it
for every process that exited below it (RUSAGE_CHILDREN of a small wrapper process), which
also covers pool processes replaced meanwhile.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.utils import timezone

from jobs.models import Image

from . import big_images
from .conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BUDGET_MB = 400
SIZES = "3840x3840,1920x1920,512x512,128x128"
REFUSED = "memory budget (WORKER_MEMORY_MB)"

# Runs a command; once it has exited, writes the largest peak resident memory (KiB) of any
# process that exited below this one, as the kernel counts it, to the file argv[1].
PEAK_OF_DESCENDANTS = r"""
import resource, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: None)  # let the worker shut down first
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def start_measured_worker(system, peak_file: Path, app: str = "project"):
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO"]
    command += ["--concurrency=2", "--hostname=memory@%h", "--without-gossip", "--without-mingle"]
    return system.spawn(
        "worker", [sys.executable, "-c", PEAK_OF_DESCENDANTS, str(peak_file), *command]
    )


class PeakSampler:
    """The highest VmHWM seen of each process below `root`, in KiB."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.peaks: dict[int, int] = {}
        self.data_limits: dict[int, int] = {}

    def sample(self) -> None:
        for process in self.root.children(recursive=True):
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                limits = Path(f"/proc/{process.pid}/limits").read_text()
            except OSError:
                continue  # exited between listing and reading
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
                    self.peaks[process.pid] = max(peak, self.peaks.get(process.pid, 0))
            for line in limits.splitlines():
                if line.startswith("Max data size") and line.split()[3] != "unlimited":
                    self.data_limits[process.pid] = int(line.split()[3])

    def until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.sample()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        self.sample()


def make_todays_archive_folder(media: Path) -> None:
    """storage.atomic_file removes the folders it created when the archive fails, and can
    race another process writing its archive into them; several images refused at once
    meet that race, so today's folder is made beforehand."""
    (media / "archives" / timezone.localtime().strftime("%Y/%m/%d")).mkdir(parents=True)


def all_final(count: int) -> bool:
    return Image.objects.filter(status__in=Image.FINAL_STATUSES, in_folder=False).count() >= count


def test_worker_memory_never_exceeds_the_budget_and_what_fits_is_done(
    system, folders, drop, tmp_path
):
    files = {
        # What must still be done at 400 MB, with sizes up to 3840 px.
        "palette-36mp.png": big_images.png(6000, 6000, "P"),
        "deep-48mp.png": big_images.png(8000, 6000, "I;16"),
        "progressive-24mp.jpg": big_images.jpeg(6000, 4000, progressive=True),
        "photo.jpg": image_bytes((1600, 1200)),
        # Near the budget: done, or refused naming it, depending on what the worker holds.
        "webp-17mp.webp": big_images.webp(4096, 4096),
        # What cannot fit: refused from the header.
        "palette-150mp.png": big_images.png(12247, 12247, "P"),
        "progressive-100mp.jpg": big_images.jpeg_header(10000, 10000, progressive=True),
        "canvas-144mp.webp": big_images.webp_header(12000, 12000),
    }
    assert max(len(data) for data in files.values()) < 2_000_000
    system.environment.update(WORKER_MEMORY_MB=str(BUDGET_MB), THUMBNAIL_SIZES=SIZES)
    make_todays_archive_folder(folders["media"])
    peak_file = tmp_path / "peak-kib"
    wrapper = start_measured_worker(system, peak_file)
    system.beat()
    for name, data in files.items():
        drop(folders["watch"], name, data)

    sampler = PeakSampler(wrapper.pid)
    sampler.until(lambda: all_final(len(files)), timeout=120, what="every file to finish")
    system.kill("worker", signal.SIGTERM)
    kernel_peak = int(peak_file.read_text())

    images = {image.name: image for image in Image.objects.all()}
    for name in ("palette-36mp.png", "deep-48mp.png", "progressive-24mp.jpg", "photo.jpg"):
        assert images[name].status == Image.Status.DONE, (name, images[name].error)
    assert images["deep-48mp.png"].thumbnails["3840x3840"] == [3840, 2880]
    for name in ("palette-150mp.png", "progressive-100mp.jpg", "canvas-144mp.webp"):
        assert images[name].status == Image.Status.FAILED
        assert REFUSED in images[name].error
        assert images[name].attempts == 1
    webp = images["webp-17mp.webp"]
    assert webp.status == Image.Status.DONE or REFUSED in webp.error, webp.error

    budget_kib = BUDGET_MB * 1024
    print(f"peak VmHWM per worker process (KiB): {sampler.peaks}; kernel peak {kernel_peak}")
    # The worker's main process and at least the two pool processes were seen; the pool
    # processes ran with a data limit under the budget.
    assert len(sampler.peaks) >= 3
    assert sampler.data_limits
    assert all(limit <= BUDGET_MB * 1024 * 1024 for limit in sampler.data_limits.values())
    assert max(sampler.peaks.values()) <= budget_kib
    assert kernel_peak <= budget_kib


def test_worker_memory_turns_a_misestimate_into_a_recorded_failure(system, folders, drop, tmp_path):
    # With the estimate switched off in the pool processes, only their OS limit stops a
    # 150 MP palette PNG shrunk to 3840 px (about 410 MB): the image fails, once, naming
    # the budget, and no worker process goes over it.
    system.environment.update(
        WORKER_MEMORY_MB=str(BUDGET_MB), THUMBNAIL_SIZES=SIZES, PARROTER_FAULT_NO_ESTIMATE="1"
    )
    make_todays_archive_folder(folders["media"])
    peak_file = tmp_path / "peak-kib"
    wrapper = start_measured_worker(system, peak_file, app="jobs.tests.fault_app")
    system.beat()
    drop(folders["watch"], "palette-150mp.png", big_images.png(12247, 12247, "P"))
    drop(folders["watch"], "photo.jpg", image_bytes((1600, 1200)))

    sampler = PeakSampler(wrapper.pid)
    sampler.until(lambda: all_final(2), timeout=90, what="both files to finish")
    system.kill("worker", signal.SIGTERM)
    kernel_peak = int(peak_file.read_text())

    failed = Image.objects.get(name="palette-150mp.png")
    assert failed.status == Image.Status.FAILED
    assert failed.error == (
        f"ran out of this worker's {BUDGET_MB} MB memory budget (WORKER_MEMORY_MB) "
        "while making its thumbnails"
    )
    assert failed.attempts == 1
    assert (folders["media"] / "failed").exists()
    assert Image.objects.get(name="photo.jpg").status == Image.Status.DONE
    print(f"peak VmHWM per worker process (KiB): {sampler.peaks}; kernel peak {kernel_peak}")
    assert max(sampler.peaks.values()) <= BUDGET_MB * 1024
    assert kernel_peak <= BUDGET_MB * 1024

"""Benchmark of one sweep: 10,000 waiting files while 0, 10,000 and 100,000 images are recorded.

    .venv/bin/python bench/sweep.py                      # throwaway SQLite file in a temp dir
    .venv/bin/python bench/sweep.py --database-url postgres://postgres@127.0.0.1/parroter
    .venv/bin/python bench/sweep.py --smoke              # 200 files, 1,000 recorded, seconds

A sweep is what `jobs.sweep_folder` does before it queues: record the sweep, repair
leftovers, list the folder, claim every ready file (one row each) and read back the ids.
It is timed with its database queries counted (jobs.sweeper.sweep_folder, the one entry
point, with its one query for nested schedules). Queueing one message per claimed image to
a real Redis (the bundled server on a free port) is timed apart: it happens after the
commit.

The history is realistic, not uniform: most recorded images lie in the folder being swept
(under the same names as the waiting files: people reuse IMG_0001.jpg), the rest in other
folders and uploads; they are done, duplicate or failed and their originals have left
(in_folder=False), plus a few still in flight in other folders. Each history size is
measured `--reps` times (the claimed rows are deleted in between) and the median shown.

With --database-url the benchmark never writes to the named database: like Django's test
runner it creates `test_<name>` beside it (the URL's user must be allowed to) and drops it
at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench")

HEADER = (
    f"{'recorded':>9}{'waiting':>9}{'claimed':>9}{'sweep s':>9}{'queries':>9}"
    f"{'scan s':>8}{'claim s':>9}{'queue s':>9}{'msg/s':>9}"
)
TARGET_SECONDS = 2.0
FILES_PER_FOLDER = 2_000


@dataclass
class Case:
    recorded: int
    waiting: int
    claimed: list[int] = field(default_factory=list)
    sweep: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    scan: list[float] = field(default_factory=list)
    claim: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)

    def line(self) -> str:
        queue = statistics.median(self.queue)
        claimed = statistics.median(self.claimed)
        return (
            f"{self.recorded:>9,}{self.waiting:>9,}{claimed:>9,.0f}"
            f"{statistics.median(self.sweep):>9.3f}{_spread(self.queries):>9}"
            f"{statistics.median(self.scan):>8.3f}{statistics.median(self.claim):>9.3f}"
            f"{queue:>9.3f}{claimed / queue if queue else 0:>9,.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="200 files, 1,000 recorded, 1 rep")
    parser.add_argument("--files", type=int, default=10_000, help="waiting files (10,000)")
    parser.add_argument(
        "--recorded",
        default="0,10000,100000",
        help="comma-separated history sizes, ascending (0,10000,100000)",
    )
    parser.add_argument("--reps", type=int, default=3, help="measured sweeps per size (3)")
    parser.add_argument("--database-url", help="e.g. postgres://user@host/name (default: SQLite)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the last sweep, top functions to stderr"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.smoke:
        args.files, args.recorded, args.reps = 200, "0,1000", 1
    recorded = sorted({int(value) for value in args.recorded.split(",") if value.strip()})

    work = Path(tempfile.mkdtemp(prefix="parroter-bench-sweep-"))
    from jobs.redis_server import start_bundled_redis

    try:
        with start_bundled_redis() as redis_server:
            _configure(work, args.database_url, redis_server.url)
            return _run(work, args.files, recorded, args.reps, args.database_url, args.profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _configure(work: Path, database_url: str | None, redis_url: str) -> None:
    """Environment for a private Parroter, read by settings at django.setup()."""
    watch = work / "inbox" / "watch"
    watch.mkdir(parents=True)
    (work / "media").mkdir()
    os.environ.update(
        {
            "DATABASE_URL": database_url or f"sqlite:///{work / 'bench.sqlite3'}",
            "WATCH_FOLDER": str(watch),
            "WATCH_ROOTS": str(work / "inbox"),
            "MEDIA_ROOT": str(work / "media"),
            "REDIS_URL": redis_url,
            "SETTLE_SECONDS": "0",
            "DJANGO_SECRET_KEY": "bench",
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "project.settings",
        }
    )
    import django

    django.setup()


def _run(
    work: Path,
    files: int,
    recorded: list[int],
    reps: int,
    database_url: str | None,
    profile: bool = False,
) -> int:
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    if database_url:
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    else:
        call_command("migrate", verbosity=0)
    try:
        watch = Path(settings.WATCH_FOLDER)
        started = time.perf_counter()
        names = _drop_files(watch, files)
        logger.info("%d files written in %.1f s", files, time.perf_counter() - started)
        cases = []
        rng = random.Random(5)
        have = 0
        for size in recorded:
            started = time.perf_counter()
            _record_history(watch, names, have, size - have, rng)
            have = size
            logger.info("%d images recorded (%.1f s)", size, time.perf_counter() - started)
            cases.append(_measure(watch, files, size, reps, profile and size == recorded[-1]))
        _report(cases, files, reps, connection)
    finally:
        if database_url:
            connection.creation.destroy_test_db(
                connection.settings_dict["NAME"], verbosity=0, keepdb=False
            )
    return 0


def _drop_files(watch: Path, count: int) -> list[str]:
    """Small files (the sweep never reads them), in a few subfolders, settled long ago."""
    names = []
    payload = b"\xff\xd8\xff\xe0" + bytes(60)
    for index in range(count):
        folder = "" if index < FILES_PER_FOLDER else f"day{index // FILES_PER_FOLDER:02d}/"
        names.append(f"{folder}IMG_{index:05d}.jpg")
    for directory in {Path(name).parent for name in names}:
        (watch / directory).mkdir(parents=True, exist_ok=True)
    past = time.time() - 3600
    for name in names:
        path = watch / name
        path.write_bytes(payload)
        os.utime(path, (past, past))
    return names


def _record_history(watch: Path, names: list[str], start: int, count: int, rng: random.Random):
    """Finished images, mostly from this folder under the same names, some in flight elsewhere."""
    from django.utils import timezone

    from jobs.models import Image, Sweep

    if count <= 0:
        return
    sizes = ["128x128", "256x256", "512x512"]
    root = watch.parent
    media = Path(os.environ["MEDIA_ROOT"])
    others = [root / "scans", root / "phone", root / "camera"]
    now = timezone.now()
    sweeps = Sweep.objects.bulk_create(
        Sweep(
            trigger=Sweep.Trigger.SCHEDULE,
            schedule_name="sweep-watch-folder",
            folder=str(watch),
            sizes=sizes,
            status=Sweep.Status.DONE,
            started_at=now - timedelta(days=90 * index / 200),
            finished_at=now - timedelta(days=90 * index / 200),
            claimed=count // 200,
        )
        for index in range(200)
    )
    statuses = [Image.Status.DONE] * 85 + [Image.Status.DUPLICATE] * 10 + [Image.Status.FAILED] * 5
    rows = []
    for number in range(start, start + count):
        where = rng.random()
        if where < 0.7:
            folder, name = watch, names[number % len(names)]
        elif where < 0.95:
            folder, name = rng.choice(others), f"DSC_{number:07d}.jpg"
        else:
            folder, name = media / "uploads", f"{number:07d}/upload.png"
        status = rng.choice(statuses)
        in_flight = number % 5_000 == 4_999 and folder != watch
        queued = now - timedelta(seconds=rng.uniform(60, 90 * 86_400))
        rows.append(
            Image(
                sweep=rng.choice(sweeps),
                source=Image.Source.UPLOAD if folder.name == "uploads" else Image.Source.FOLDER,
                folder=str(folder),
                name=name,
                source_path=f"{folder}/{name}",
                original_path="" if in_flight else f"{media}/originals/{number}-{name}",
                in_folder=in_flight,
                file_size=rng.randint(200_000, 8_000_000),
                mtime_ns=int(queued.timestamp() * 1e9),
                sha256=rng.getrandbits(256).to_bytes(32, "big").hex(),
                width=4000,
                height=3000,
                format="JPEG",
                sizes=sizes,
                sizes_key=",".join(sizes),
                thumbnails={} if in_flight else {size: [128, 96] for size in sizes},
                status=Image.Status.PENDING if in_flight else status,
                archive="" if in_flight else f"archives/{number}.zip",
                error="cannot identify image file" if status == Image.Status.FAILED else "",
                attempts=1,
                queued_at=queued,
                started_at=None if in_flight else queued + timedelta(seconds=1),
                finished_at=None if in_flight else queued + timedelta(seconds=2),
            )
        )
    # The unique "done" index allows one done row per content and sizes: the hashes are
    # random, so that holds.
    Image.objects.bulk_create(rows, batch_size=2_000)


def _measure(watch: Path, files: int, recorded: int, reps: int, profile: bool = False) -> Case:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import sweeper, tasks
    from jobs.broker import queue_length
    from jobs.models import Image, Sweep

    case = Case(recorded, files)
    for rep in range(reps):
        profiler = cProfile.Profile() if profile and rep == reps - 1 else None
        timings = _Timings()
        with (
            _timed(sweeper, "scan", timings),
            _timed(sweeper, "claim", timings),
            CaptureQueriesContext(connection) as queries,
        ):
            if profiler:
                profiler.enable()
            started = time.perf_counter()
            outcome = sweeper.sweep_folder(str(watch), None)
            elapsed = time.perf_counter() - started
            if profiler:
                profiler.disable()
        if outcome.sweep.status != Sweep.Status.DONE or len(outcome.to_queue) != files:
            raise SystemExit(
                f"sweep claimed {len(outcome.to_queue)} of {files} files "
                f"({outcome.sweep.status}: {outcome.sweep.error})"
            )
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        tasks.queue_images(outcome.to_queue)
        queued = time.perf_counter() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
        waiting = queue_length()
        if waiting != files:
            raise SystemExit(f"{waiting} messages in the queue, expected {files}")
        case.claimed.append(len(outcome.to_queue))
        case.sweep.append(elapsed)
        case.queries.append(len(queries.captured_queries))
        case.scan.append(timings.seconds["scan"])
        case.claim.append(timings.seconds["claim"])
        case.queue.append(queued)
        # Back to "waiting, unclaimed" for the next measurement.
        Image.objects.filter(sweep=outcome.sweep).delete()
        _empty_queue(tasks)
    logger.info("recorded %d: %s", recorded, case.line())
    return case


class _Timings:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}


class _timed:
    """Wrap a module function for the length of a block, adding up its wall time."""

    def __init__(self, module: object, name: str, timings: _Timings) -> None:
        self.module, self.name, self.timings = module, name, timings
        self.original: Callable[..., object] = getattr(module, name)

    def __enter__(self) -> None:
        original, timings, name = self.original, self.timings, self.name
        timings.seconds[name] = 0.0

        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timings.seconds[name] += time.perf_counter() - started

        setattr(self.module, self.name, wrapper)

    def __exit__(self, *exc: object) -> None:
        setattr(self.module, self.name, self.original)


def _empty_queue(tasks) -> None:
    from django.conf import settings

    with tasks.sweep_folder.app.connection_for_write() as connection:
        connection.default_channel.client.delete(settings.IMAGE_QUEUE)


def _spread(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _report(cases: list[Case], files: int, reps: int, connection) -> None:
    write = sys.stdout.write
    vendor = connection.vendor
    write(
        f"Parroter sweep benchmark: {files:,} waiting files, {vendor} database, "
        f"{reps} measured sweep(s) per history size (median), one process\n"
        "sweep s = jobs.sweeper.sweep_folder (with the nested-schedule lookup), in one process, "
        "with its queries;\nqueue s = one message per claimed image to the bundled Redis, "
        "after the commit\n\n"
    )
    write(HEADER + "\n")
    for case in cases:
        write(case.line() + "\n")
    write("\n")
    counts = {count for case in cases for count in case.queries}
    write(
        "queries per sweep: "
        + (
            f"{counts.pop()} whatever the history (does not grow)\n"
            if len(counts) == 1
            else f"{sorted(counts)} (differs with history)\n"
        )
    )
    largest = cases[-1]
    total = statistics.median(largest.sweep)
    write(
        f"sweep of {largest.waiting:,} files with {largest.recorded:,} recorded: "
        f"{total:.2f} s (target <= {TARGET_SECONDS:.0f} s: "
        f"{'met' if total <= TARGET_SECONDS else 'missed'}); queueing "
        f"{statistics.median(largest.queue):.2f} s more\n"
    )


if __name__ == "__main__":
    sys.exit(main())

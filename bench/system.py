"""Benchmark of the whole system against the pipeline alone and the tutorial, in one run.

    .venv/bin/python bench/system.py             # bench corpus x 20 per run, 3 runs
    .venv/bin/python bench/system.py --smoke     # tiny generated corpus, seconds

Starts Parroter as `make run` does, on temporary folders and a temporary SQLite database:
the bundled Redis, a `celery worker --concurrency 2` and `celery beat` (SWEEP_INTERVAL=1,
SETTLE_SECONDS=0.5). After a warm-up batch, each run drops N images into the watched
folder at once (renamed in from a staging folder on the same file system, as a careful
copier does) and waits until every one is recorded final. Throughput is N over the time
from the first drop to the last `finished_at`: it includes the wait before the first claim
(with watch events, the sweep the watch sends for files renamed in; without, the settle
delay and the next periodic sweep); "claimed -> recorded" leaves it out (first
`started_at` to last `finished_at`).

Then, with the system stopped, the same images (same bytes) go through
jobs.pipeline.build_archive in a multiprocessing Pool(2), and through the tutorial's
make_thumbnails (bench/pipeline.py) back to back in one process. Every copy of a corpus
file gets a unique trailer after its image data, so no copy is recorded as a duplicate.

`--corpus mixed` runs on the real wallpapers of bench/corpus.py's build_mixed instead,
`--sweep-interval`/`--settle` try other values of those two settings, and `--postgres URL`
runs the system on a PostgreSQL database of its own made on that server. Where the time
per image goes beyond the pipeline is printed last: the wait before work starts (drop ->
claim, claim -> started); how long the pool processes sat between images and at the end
of a batch; measured in this process over claimed copies with the system paused, what
jobs.runner spends in SQL statements, fsyncs, moving the original, sha256 and the rest,
each exclusive of the others; and, written down by the worker's own pool processes
(bench/timed_worker.py), each part of an image's task: jobs.runner, Celery's result rows,
the time from one task to the next, the sweeps run meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus

logger = logging.getLogger("bench")

HEADER = (
    f"{'method':<34}{'images':>7}{'failed':>7}{'wall s':>9}{'img/s':>8}{'CPU ms/img':>12}"
    f"{'runs':>6}"
)
SIZES = "128x128,256x256,512x512"
SYSTEM_TARGET = 0.9
TUTORIAL_TARGET = 3.5
CONCURRENCY = 2


@dataclass
class Runs:
    images: int = 0
    failed: int = 0
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def add(self, images: int, failed: int, wall: float, cpu: float | None = None) -> None:
        self.images, self.failed = images, failed
        self.walls.append(wall)
        if cpu is not None:
            self.cpus.append(cpu)

    def rate(self) -> float:
        return self.images / statistics.median(self.walls)

    def line(self, name: str) -> str:
        wall = statistics.median(self.walls)
        spread = (
            f"  ({min(self.images / w for w in self.walls):.1f}-"
            f"{max(self.images / w for w in self.walls):.1f})"
            if len(self.walls) > 1
            else ""
        )
        cpu = statistics.median(self.cpus) * 1000 / self.images if self.cpus else float("nan")
        return (
            f"{name:<34}{self.images:>7}{self.failed:>7}{wall:>9.2f}"
            f"{self.rate():>8.1f}{cpu:>12.1f}{len(self.walls):>6}{spread}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny generated corpus, 1 run")
    parser.add_argument("--rounds", type=int, default=20, help="corpus copies per run (20)")
    parser.add_argument("--reps", type=int, default=3, help="measured runs of each (3)")
    parser.add_argument(
        "--tutorial-rounds", type=int, default=2, help="corpus copies for the tutorial (2)"
    )
    parser.add_argument("--worker-app", default="bench.timed_worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", choices=("bench", "mixed"), default="bench")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="a PostgreSQL server (postgres://user@host:port/db) to run on instead of SQLite: "
        "a database of the bench's own is made there and dropped afterwards",
    )
    parser.add_argument("--sweep-interval", default="1", help="SWEEP_INTERVAL (1)")
    parser.add_argument("--settle", default="0.5", help="SETTLE_SECONDS (0.5)")
    parser.add_argument(
        "--libvips",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LIBVIPS_DECODE (default: on, as in settings)",
    )
    parser.add_argument(
        "--watch-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="WATCH_EVENTS (default: on, as in settings on Linux)",
    )
    args = parser.parse_args(argv)
    # A stopped benchmark must still stop the worker, beat and Redis it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    if args.smoke:
        args.rounds, args.reps, args.tutorial_rounds = 1, 1, 1

    built = (corpus.build if args.corpus == "bench" else corpus.build_mixed)(smoke=args.smoke)
    work = Path(tempfile.mkdtemp(prefix="parroter-bench-system-"))
    try:
        from jobs.redis_server import start_bundled_redis

        with _database(work, args.postgres) as database_url, start_bundled_redis() as redis:
            environment = _configure(work, database_url, redis.url, args)
            return _run(work, environment, list(built.files), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.smoke:
            shutil.rmtree(built.files[0].parent, ignore_errors=True)


@contextlib.contextmanager
def _database(work: Path, postgres: str | None) -> Iterator[str]:
    """A DATABASE_URL of the bench's own: a SQLite file in `work`, or a database made on
    the PostgreSQL server `postgres` and dropped afterwards."""
    if not postgres:
        yield f"sqlite:///{work / 'bench.sqlite3'}"
        return
    import psycopg

    server = urlsplit(postgres)
    name = f"parroter_bench_{os.getpid()}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(server._replace(path=f"/{name}"))
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _configure(work: Path, database_url: str, redis_url: str, args) -> dict[str, str]:
    """The environment of every process of this system, also set up in this one."""
    for name in ("inbox/watch", "media", "staging", "out", "logs"):
        (work / name).mkdir(parents=True)
    environment = {
        "DATABASE_URL": database_url,
        "WATCH_FOLDER": str(work / "inbox" / "watch"),
        "WATCH_ROOTS": str(work / "inbox"),
        "MEDIA_ROOT": str(work / "media"),
        "REDIS_URL": redis_url,
        "SWEEP_INTERVAL": args.sweep_interval,
        "SETTLE_SECONDS": args.settle,
        "LIBVIPS_DECODE": "true" if args.libvips else "false",
        "WATCH_EVENTS": "true" if args.watch_events else "false",
        "THUMBNAIL_SIZES": SIZES,
        "WORKER_CONCURRENCY": str(CONCURRENCY),
        "DJANGO_SECRET_KEY": "bench",
        "DJANGO_SETTINGS_MODULE": "project.settings",
        # Where bench/timed_worker.py writes the times of each task's parts.
        "BENCH_PHASES": str(work / "logs" / "phases.jsonl"),
    }
    os.environ.update(environment)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return {**os.environ, **environment}


def _run(work: Path, environment: dict[str, str], files: list[Path], args) -> int:
    from jobs.tests.processes import Processes

    processes = Processes(work / "logs", environment)
    system, claimed = Runs(), Runs()
    processing, alone, tutorial = Runs(), Runs(), Runs()
    in_task: list[float] = []
    per_image: list[float] = []
    latencies: list[tuple[float, float]] = []
    idles: list[tuple[float, float]] = []
    phases: list[Phases] = []
    breakdowns: list[Breakdown] = []
    try:
        processes.worker(concurrency=CONCURRENCY, app=args.worker_app)
        processes.beat()
        _wait(_system_is_live, 60, "the first sweep", processes)
        logger.info("system live; warm-up batch")
        warm = _drop_and_wait(work, files, 1, "warm", processes)
        _pause(processes)
        logger.info("warm-up of the runs without the system")
        _processing(work, warm.paths, "warm")
        _pipeline_alone(warm.paths, work / "out")
        _tutorial(warm.paths, work / "out")
        # Interleaved, so that load from elsewhere on the machine hits every method alike.
        for rep in range(args.reps):
            logger.info("run %d of %d: system", rep + 1, args.reps)
            _resume(processes)
            cpu = _group_cpu(processes)
            batch = _drop_and_wait(work, files, args.rounds, f"run{rep}", processes)
            cpu = _group_cpu(processes) - cpu
            _pause(processes)
            for runs, wall in ((system, batch.drop_wall), (claimed, batch.claim_wall)):
                runs.add(batch.images, batch.failed, wall, cpu)
            in_task.append(batch.mean_in_task)
            latencies.append((batch.claim_latency, batch.queue_wait))
            idles.append((batch.between_tasks, batch.tail))
            phases.append(batch.phases)
            logger.info("run %d of %d: where processing's time goes", rep + 1, args.reps)
            breakdowns.append(_breakdown(work, batch.paths[: max(8, len(files))], f"run{rep}"))
            logger.info("run %d of %d: processing without Celery", rep + 1, args.reps)
            processing.add(*_processing(work, batch.paths, f"run{rep}"))
            logger.info("run %d of %d: pipeline alone", rep + 1, args.reps)
            wall, failed, seconds, cpu = _pipeline_alone(batch.paths, work / "out")
            alone.add(len(batch.paths) - failed, failed, wall, cpu)
            per_image.append(seconds)
            logger.info("run %d of %d: tutorial", rep + 1, args.reps)
            # Whole copies of the corpus, so that the tutorial sees the same mix.
            sample = [
                path for path in batch.paths if int(path.name.split("-")[2]) < args.tutorial_rounds
            ]
            wall, failed, cpu = _tutorial(sample, work / "out")
            tutorial.add(len(sample) - failed, failed, wall, cpu)
    except BaseException:
        sys.stderr.write(processes.logs()[-8000:] + "\n")
        raise
    finally:
        # A frozen worker would not hear the SIGTERM that stops it.
        if "worker" in processes.running:
            os.killpg(processes.running["worker"].pid, signal.SIGCONT)
        processes.stop_all()
    _report(
        args,
        len(files),
        {
            "system, drop -> recorded": system,
            "system, claimed -> recorded": claimed,
            f"runner.py, Pool({CONCURRENCY}), no Celery": processing,
            f"pipeline alone, Pool({CONCURRENCY})": alone,
            "tutorial, back to back, 1 process": tutorial,
        },
        statistics.median(in_task),
        statistics.median(per_image),
    )
    _report_breakdown(latencies, idles, breakdowns, args)
    _report_phases(phases)
    return 0


def _system_is_live() -> bool:
    return _last_swept() is not None


def _last_swept():
    """When a worker last ran a scheduled sweep, idle or not (idle ones leave no Sweep row)."""
    from django.db.models import Max

    from jobs.models import ScheduleActivity

    return ScheduleActivity.objects.aggregate(last=Max("swept_at"))["last"]


def _group_cpu(processes) -> float:
    """CPU seconds used so far by every process of the worker's and beat's groups."""
    groups = {process.pid for process in processes.running.values()}
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) in groups:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _pause(processes) -> None:
    """Stop beat, let the sweep in hand finish, then freeze the idle worker.

    Beat is stopped, not frozen: frozen in the middle of writing its schedule it would hold
    SQLite's write lock, and every run without the system would wait on it.
    """
    processes.kill("beat", signal.SIGTERM)
    time.sleep(1.5)
    os.killpg(processes.running["worker"].pid, signal.SIGSTOP)


def _resume(processes) -> None:
    """Thaw the worker and start beat again; back once a new sweep has run."""
    if "worker" in processes.running:
        os.killpg(processes.running["worker"].pid, signal.SIGCONT)
    if "beat" not in processes.running:
        last = _last_swept()
        processes.beat()
        _wait(lambda: _last_swept() != last, 60, "beat to sweep again", processes)


@dataclass
class Batch:
    paths: list[Path]
    images: int
    failed: int
    drop_wall: float
    claim_wall: float
    mean_in_task: float
    claim_latency: float = 0.0  # the drop to the first claim: settle wait and sweep interval
    queue_wait: float = 0.0  # claimed to started, mean: the message and a free worker
    between_tasks: float = 0.0  # a pool process's finished_at to its next started_at, mean
    tail: float = 0.0  # the end of the batch with one pool process idle for good
    phases: Phases = field(default_factory=lambda: Phases())


def _stage(work: Path, files: list[Path], rounds: int, tag: str) -> list[Path]:
    """Copies of the files, each with a unique trailer after its image data, synced."""
    staging = work / "staging" / tag
    staging.mkdir()
    staged = []
    for number in range(rounds):
        for path in files:
            copy = staging / f"{tag}-{number:03d}-{path.name}"
            copy.write_bytes(path.read_bytes() + f"\0parroter-bench {tag} {number}".encode())
            staged.append(copy)
    # Nothing of the staging left to write back while the system runs.
    os.sync()
    return staged


def _drop_and_wait(work: Path, files: list[Path], rounds: int, tag: str, processes) -> Batch:
    """Rename staged copies into the watched folder at once, wait until all are recorded."""
    from django.conf import settings
    from django.db.models import Avg, F, Max, Min

    from jobs.models import Image

    staged = _stage(work, files, rounds, tag)
    phases_file = Path(os.environ["BENCH_PHASES"])
    phases_file.unlink(missing_ok=True)
    before = Image.objects.aggregate(last=Max("id"))["last"] or 0
    watch = Path(settings.WATCH_FOLDER)
    dropped = time.time()
    for copy in staged:
        os.rename(copy, watch / copy.name)
    # Only these files are in the folder: every new row is one of them.
    rows = Image.objects.filter(id__gt=before)

    def all_final() -> bool:
        # Recorded final and the original put away: what the runs below read.
        finished = rows.filter(status__in=Image.FINAL_STATUSES, in_folder=False)
        return finished.count() == len(staged)

    # Seldom: the times come from the records, and each look is work on the measured cores.
    _wait(all_final, 120 + 2 * len(staged), f"{len(staged)} images of {tag}", processes, 0.5)
    figures = rows.aggregate(
        first_start=Min("started_at"),
        last_finish=Max("finished_at"),
        in_task=Avg(F("finished_at") - F("started_at")),
        first_claim=Min("queued_at"),
        queue_wait=Avg(F("started_at") - F("queued_at")),
    )
    failed = rows.exclude(status=Image.Status.DONE)
    for image in failed.values("name", "status", "error")[:5]:
        logger.warning("  %s", image)
    # The originals the system kept are the input of the runs without it.
    paths = sorted(
        Path(path)
        for path in rows.filter(status=Image.Status.DONE).values_list("original_path", flat=True)
    )
    in_task = figures["in_task"]
    between_tasks, tail = _idle(rows.values_list("worker", "started_at", "finished_at"))
    return Batch(
        paths=paths,
        images=len(staged) - failed.count(),
        failed=failed.count(),
        drop_wall=figures["last_finish"].timestamp() - dropped,
        claim_wall=(figures["last_finish"] - figures["first_start"]).total_seconds(),
        mean_in_task=in_task.total_seconds() if in_task is not None else 0.0,
        claim_latency=figures["first_claim"].timestamp() - dropped,
        queue_wait=figures["queue_wait"].total_seconds() if figures["queue_wait"] else 0.0,
        between_tasks=between_tasks,
        tail=tail,
        phases=Phases.read(phases_file),
    )


@dataclass
class Phases:
    """Mean milliseconds per image task in a pool process, by part (bench/timed_worker.py),
    over one batch; and the sweeps the same processes ran meanwhile."""

    tasks: int = 0
    parts: dict[str, float] = field(default_factory=dict)
    sweeps: int = 0
    sweep_ms: float = 0.0
    # The largest peak resident memory of a pool process, MB.
    peak_mb: float = 0.0

    @classmethod
    def read(cls, path: Path) -> Phases:
        if not path.exists():
            return cls()
        by_process = defaultdict(list)
        for line in path.read_text().splitlines():
            task = json.loads(line)
            by_process[task["pid"]].append(
                (task["task"], dict(task["marks"]), task.get("peak_kib", 0))
            )
        sums: dict[str, float] = defaultdict(float)
        tasks, sweeps, sweep_seconds, gaps = 0, 0, 0.0, []
        peak_kib = max((peak for runs in by_process.values() for *_, peak in runs), default=0)
        for runs in by_process.values():
            runs.sort(key=lambda run: run[1]["prerun"])
            for number, (name, marks, _) in enumerate(runs):
                whole = marks["postrun"] - marks["prerun"]
                if name != "jobs.make_thumbnails":
                    sweeps += 1
                    sweep_seconds += whole
                    continue
                tasks += 1
                spans = {
                    part: marks.get(f"{part} end", 0.0) - marks.get(f"{part} start", 0.0)
                    for part in ("STARTED row", "run", "put away", "SUCCESS row")
                }
                for part, seconds in spans.items():
                    sums[part] += seconds
                sums["Celery's other work in the task"] += whole - (
                    spans["STARTED row"] + spans["run"] + spans["SUCCESS row"]
                )
                if number + 1 < len(runs):
                    gaps.append(runs[number + 1][1]["prerun"] - marks["postrun"])
        parts = {part: seconds * 1000 / max(tasks, 1) for part, seconds in sums.items()}
        parts["between tasks"] = statistics.mean(gaps) * 1000 if gaps else 0.0
        return cls(tasks, parts, sweeps, sweep_seconds * 1000 / max(sweeps, 1), peak_kib / 1024)


def _idle(runs) -> tuple[float, float]:
    """From (worker, started_at, finished_at) of a batch's images: the mean time a pool
    process spent between recording one image and starting its next (putting the original
    away, Celery's result row, the acknowledgement, the next message, the STARTED row), and
    the time at the end when one process had no image left to take."""
    by_process = defaultdict(list)
    for worker, started, finished in runs:
        by_process[worker].append((started.timestamp(), finished.timestamp()))
    gaps = [
        following[0] - previous[1]
        for spans in by_process.values()
        for previous, following in zip(sorted(spans), sorted(spans)[1:], strict=False)
    ]
    ends = sorted(max(finished for _, finished in spans) for spans in by_process.values())
    tail = ends[-1] - ends[-2] if len(ends) > 1 else 0.0
    return (statistics.mean(gaps) if gaps else 0.0), tail


def _wait(condition, timeout: float, what: str, processes, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for name, process in processes.running.items():
            if process.poll() is not None:
                raise SystemExit(f"celery {name} exited with code {process.returncode}")
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


# --- without the system ----------------------------------------------------------------


def _claimed_copies(work: Path, originals: list[Path], tag: str) -> list[int]:
    """Fresh copies of the originals in a folder of their own, claimed by a sweep here."""
    from django.conf import settings

    from jobs import sweeper
    from jobs.models import Sweep

    folder = work / "inbox" / tag
    folder.mkdir()
    for copy in _stage(work, originals, 1, tag):
        os.rename(copy, folder / copy.name)
    settings.SETTLE_SECONDS = 0
    outcome = sweeper.sweep_folder(str(folder), SIZES)
    assert outcome.sweep.status == Sweep.Status.DONE, outcome.sweep.error
    return outcome.to_queue


def _processing(work: Path, originals: list[Path], tag: str) -> tuple[int, int, float, float]:
    """jobs.runner over fresh copies in Pool(2), claimed by a sweep here: no Celery."""
    from django.db import connections

    from jobs.models import Image

    ids = _claimed_copies(work, originals, f"direct-{tag}")
    # Each pool process opens its own database connection.
    connections.close_all()
    with _pool() as pool:
        started = time.perf_counter()
        results = list(pool.imap_unordered(_process, ids))
        wall = time.perf_counter() - started
    done = sum(1 for status, _ in results if status == Image.Status.DONE)
    return done, len(ids) - done, wall, sum(cpu for _, cpu in results)


@dataclass
class Breakdown:
    """Milliseconds per image in jobs.runner, by what it was doing, and call counts."""

    images: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stack: list[float] = field(default_factory=list)

    def timed(self, name: str, function):
        """`function`, its time counted under `name`, less the time of timed calls inside."""

        def wrapped(*args, **kwargs):
            self.stack.append(0.0)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = self.stack.pop()
                self.seconds[name] += elapsed - inner
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1] += elapsed

        return wrapped


def _breakdown(work: Path, originals: list[Path], tag: str) -> Breakdown:
    """jobs.runner over fresh copies, one at a time in this process, every SQL
    statement, fsync, original moved, sha256 and pipeline call timed; the rest is Python."""
    from django.conf import settings
    from django.db import connection

    from jobs import pipeline, runner, storage

    ids = _claimed_copies(work, originals, f"breakdown-{tag}")
    breakdown = Breakdown(images=len(ids))
    # This process is no pool process: it holds the bench's own data, which the budget of
    # one (checked against what the process holds) would count against large images.
    budget = settings.WORKER_MEMORY_MB
    settings.WORKER_MEMORY_MB = 1 << 20
    patches = [
        (os, "fsync", "fsync"),
        (storage, "move_original", "moving the original (rename)"),
        (storage, "read_original", "reading the original"),
        (hashlib, "sha256", "sha256 of the original"),
        (pipeline, "write_archive", "pipeline (write_archive)"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, label in patches:
        setattr(owner, name, breakdown.timed(label, getattr(owner, name)))
    statement = breakdown.timed("SQL statements", lambda execute, *args: execute(*args))
    # Commits do not go through execute: on SQLite each one is a write to the database file.
    connection.ensure_connection()
    connection.commit = breakdown.timed("SQL commits", connection.commit)
    try:
        with connection.execute_wrapper(
            lambda execute, sql, params, many, context: statement(
                execute, sql, params, many, context
            )
        ):
            run = breakdown.timed("process_image in all", runner.process_image)
            for image_id in ids:
                run(image_id)
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        del connection.commit
        settings.WORKER_MEMORY_MB = budget
    return breakdown


def _pool() -> multiprocessing.pool.Pool:
    """Two fresh processes, started before the clock starts.

    Spawned, not forked: a fork copies whatever lock another thread of this process (a
    broker or logging thread) holds at that moment, and can hang the child forever.
    """
    pool = multiprocessing.get_context("spawn").Pool(CONCURRENCY, initializer=_setup_django)
    pool.map(abs, range(CONCURRENCY))
    return pool


def _setup_django() -> None:
    import django

    django.setup()


def _process(image_id: int) -> tuple[str, float]:
    from jobs import runner

    started = time.process_time()
    return runner.process_image(image_id), time.process_time() - started


def _archive(job: tuple[Path, Path]) -> tuple[bool, float, float]:
    from django.conf import settings

    from jobs import pipeline, storage

    path, out = job
    started, cpu = time.perf_counter(), time.process_time()
    try:
        with storage.atomic_file(out / f"{path.name}.zip") as archive:
            pipeline.write_archive(
                path.read_bytes(),
                path.name,
                archive,
                pipeline.parse_sizes(SIZES),
                limits=pipeline.Limits(
                    max_pixels=settings.MAX_IMAGE_PIXELS, max_bytes=settings.MAX_IMAGE_BYTES
                ),
                options=pipeline.EncodeOptions(jpeg_quality=settings.JPEG_QUALITY),
                libvips=settings.LIBVIPS_DECODE,
            )
    except Exception:
        logger.warning("pipeline alone failed on %s", path.name, exc_info=True)
        ok = False
    else:
        ok = True
    return ok, time.perf_counter() - started, time.process_time() - cpu


def _pipeline_alone(paths: list[Path], out: Path) -> tuple[float, int, float, float]:
    """Wall time for all paths in Pool(2) (one image per task), failures, mean s per image,
    CPU seconds in all."""
    with _pool() as pool:
        started = time.perf_counter()
        results = list(pool.imap_unordered(_archive, [(path, out) for path in paths]))
        wall = time.perf_counter() - started
    _empty(out)
    failed = sum(1 for ok, _, _ in results if not ok)
    return (
        wall,
        failed,
        statistics.mean(seconds for _, seconds, _ in results),
        sum(cpu for _, _, cpu in results),
    )


def _tutorial(paths: list[Path], out: Path) -> tuple[float, int, float]:
    import pipeline as bench_pipeline

    from jobs import pipeline

    sizes = pipeline.parse_sizes(SIZES)
    failed = 0
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        try:
            bench_pipeline.tutorial(path, out, sizes)
        except Exception:
            failed += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    _empty(out)
    return wall, failed, cpu


def _empty(folder: Path) -> None:
    for leftover in folder.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


# --- the report -------------------------------------------------------------------------


def _report(args, corpus_size: int, rows: dict[str, Runs], in_task, per_image) -> None:
    write = sys.stdout.write
    system, claimed, processing, alone, tutorial = rows.values()
    write(
        f"Parroter system benchmark: {corpus_size} corpus files x {args.rounds} per run "
        f"({system.images + system.failed} images), {args.reps} run(s) of each after a "
        f"warm-up, interleaved, median (range) shown; worker --concurrency {CONCURRENCY}, "
        f"SWEEP_INTERVAL={args.sweep_interval}, SETTLE_SECONDS={args.settle}, "
        f"{'PostgreSQL' if args.postgres else 'SQLite'}\n\n"
    )
    write(HEADER + "\n")
    for name, runs in rows.items():
        write(runs.line(name) + "\n")
    write("\n")
    ratio = system.rate() / alone.rate()
    write(
        f"system / pipeline alone   {ratio:5.2f}  (target >= {SYSTEM_TARGET}: "
        f"{'met' if ratio >= SYSTEM_TARGET else 'missed'}); claimed -> recorded "
        f"{claimed.rate() / alone.rate():5.2f}, runner.py without Celery "
        f"{processing.rate() / alone.rate():5.2f}\n"
    )
    ratio = system.rate() / tutorial.rate()
    write(
        f"system / tutorial         {ratio:5.2f}x (target >= {TUTORIAL_TARGET}x: "
        f"{'met' if ratio >= TUTORIAL_TARGET else 'missed'}); pipeline alone / tutorial "
        f"{alone.rate() / tutorial.rate():5.2f}x\n"
    )

    def cost(runs: Runs) -> float:
        return (CONCURRENCY / runs.rate() - CONCURRENCY / alone.rate()) * 1000

    write(
        f"per image and process: {per_image * 1000:.0f} ms in the pipeline alone, "
        f"{in_task * 1000:.0f} ms from started_at to finished_at in the system; on top of "
        f"the pipeline: runner.py {cost(processing):.0f} ms, Celery and processing "
        f"{cost(claimed):.0f} ms, with the sweep latency {cost(system):.0f} ms\n"
    )


def _report_breakdown(latencies, idles, breakdowns: list[Breakdown], args) -> None:
    write = sys.stdout.write
    claim = statistics.median(latency for latency, _ in latencies)
    queue = statistics.median(wait for _, wait in latencies)
    # The bench renames its files in: with watch events, the watch's sweep takes them at once.
    wait = "the watch's sweep" if args.watch_events else "settle wait + sweep interval"
    write(
        f"\nbefore work starts (SWEEP_INTERVAL={args.sweep_interval}, "
        f"SETTLE_SECONDS={args.settle}, LIBVIPS_DECODE={args.libvips}, "
        f"WATCH_EVENTS={args.watch_events}): drop -> first claim "
        f"{claim * 1000:.0f} ms a batch ({wait}), claim -> started {queue * 1000:.0f} ms an "
        "image on average (its message, and the images queued before it)\n"
    )
    between = statistics.median(gap for gap, _ in idles)
    tail = statistics.median(tail for _, tail in idles)
    write(
        f"pool processes idle: {between * 1000:.1f} ms between one image's finished_at and "
        f"the next one's started_at (mean), {tail * 1000:.0f} ms a batch at its end with one "
        "process out of images\n"
    )
    images = sum(b.images for b in breakdowns)
    labels = sorted(
        {label for b in breakdowns for label in b.seconds},
        key=lambda label: -sum(b.seconds[label] for b in breakdowns),
    )
    write(
        f"jobs.runner alone, {images} images one at a time in this process, ms per image "
        "(each exclusive of the others; calls per image):\n"
    )
    for label in labels:
        seconds = sum(b.seconds[label] for b in breakdowns)
        calls = sum(b.calls[label] for b in breakdowns)
        name = "rest (ORM, Python, lease thread)" if label == "process_image in all" else label
        write(f"  {name:<36}{seconds * 1000 / images:>8.1f} ms{calls / images:>7.1f}\n")
    total = sum(sum(b.seconds.values()) for b in breakdowns)
    write(f"  {'all of process_image':<36}{total * 1000 / images:>8.1f} ms\n")


def _report_phases(batches: list[Phases]) -> None:
    """The median over the runs of each part's mean per image task."""
    batches = [batch for batch in batches if batch.tasks]
    if not batches:
        return
    write = sys.stdout.write
    write(
        "in the pool processes, per image task, ms (median of the runs' means; "
        "bench/timed_worker.py):\n"
    )
    labels = {
        "run": "jobs.runner (the pipeline included)",
        "put away": "  of it: putting the original away",
        "STARTED row": "Celery's STARTED result row",
        "SUCCESS row": "Celery's SUCCESS result row",
        "Celery's other work in the task": "Celery's other work in the task",
        "between tasks": "from one task's end to the next's start",
    }
    for part, label in labels.items():
        value = statistics.median(batch.parts.get(part, 0.0) for batch in batches)
        write(f"  {label:<44}{value:>8.1f} ms\n")
    sweeps = statistics.median(batch.sweeps for batch in batches)
    sweep_ms = statistics.median(batch.sweep_ms for batch in batches)
    write(
        f"  sweeps run by the same processes meanwhile: {sweeps:g} a batch, "
        f"{sweep_ms:.1f} ms each\n"
    )
    from django.conf import settings

    peak = max(batch.peak_mb for batch in batches)
    write(
        f"  peak resident memory of a pool process, all runs: {peak:.0f} MB "
        f"(WORKER_MEMORY_MB: {settings.WORKER_MEMORY_MB})\n"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Is the system alive? Heartbeats written by beat and workers, and the checks of /healthz.

Every probe runs in a thread of its own against one deadline (HEALTH_TIMEOUT), so a hung
NFS mount, a broker that drops packets or a locked database makes its check fail instead
of holding the answer. A folder probe that is still hanging from an earlier request is
waited on again rather than started anew, so a dead mount does not pile up threads.

A watch folder that is a share must not read as an empty folder when the share is gone.
Each folder's mount point (from /proc/self/mountinfo) is remembered in the database the
first time it is seen, and again whenever the folder is found on a deeper mount (the share
was mounted later); a folder found on a shallower mount than remembered is reported as
unmounted. A folder moved off its share on purpose is forgotten by deleting its heartbeat
row in the admin.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kombu
import redis
from celery import current_app
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, connections
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from .models import Heartbeat

logger = logging.getLogger(__name__)

SWEEP_TASK = "jobs.sweep_folder"
MOUNTINFO = Path("/proc/self/mountinfo")
# Space, tab, newline and backslash in a mount point are written as \ooo in mountinfo.
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# Worker rows not seen for this long are forgotten (a worker renamed or gone for good).
FORGET_WORKERS_AFTER = timedelta(days=1)
# django-celery-beat's scheduler ticks at least this often, however far the next task is.
BEAT_MAX_TICK = 5.0


def stale_after() -> timedelta:
    """A beat or worker heartbeat older than this means that process is gone or stuck."""
    return timedelta(seconds=3 * settings.HEARTBEAT_SECONDS + BEAT_MAX_TICK)


# --- Heartbeats -------------------------------------------------------------------------


class BeatHeartbeat:
    """Called on every beat tick; writes to the database at most every HEARTBEAT_SECONDS."""

    def __init__(self) -> None:
        self.name = f"beat@{socket.gethostname()}"
        self.last = float("-inf")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < settings.HEARTBEAT_SECONDS:
            return
        self.last = now
        try:
            Heartbeat.record(Heartbeat.Kind.BEAT, self.name)
        except DatabaseError as exc:
            # Beat goes on scheduling; /healthz will say beat is stale if this persists.
            logger.warning("cannot record beat's heartbeat: %s", exc)
            close_old_connections()


class WorkerHeartbeat(threading.Thread):
    """A thread in a worker's main process recording the node as alive every few seconds.

    It opens a database connection for each write and closes it, so that no connection is
    open across the fork of a new pool process.
    """

    def __init__(self, node: str) -> None:
        super().__init__(name="parroter-heartbeat", daemon=True)
        self.node = node
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            Heartbeat.objects.filter(
                kind=Heartbeat.Kind.WORKER, seen_at__lt=timezone.now() - FORGET_WORKERS_AFTER
            ).delete()
        except DatabaseError as exc:
            logger.warning("cannot forget old worker heartbeats: %s", exc)
        while not self.stopped.is_set():
            try:
                Heartbeat.record(Heartbeat.Kind.WORKER, self.node)
            except DatabaseError as exc:
                logger.warning("cannot record the heartbeat of %s: %s", self.node, exc)
            finally:
                connections.close_all()
            self.stopped.wait(settings.HEARTBEAT_SECONDS)

    def stop(self) -> None:
        """Stop beating and remove the row: a worker that shut down is not alive."""
        self.stopped.set()
        self.join(timeout=5)
        try:
            Heartbeat.objects.filter(kind=Heartbeat.Kind.WORKER, name=self.node).delete()
        except DatabaseError as exc:
            logger.warning("cannot remove the heartbeat of %s: %s", self.node, exc)


_worker_heartbeat: WorkerHeartbeat | None = None


def start_worker_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    """`worker_ready` receiver: sender is the worker's consumer, named by its node.

    Only a worker that takes images beats: one started for the webhook queue alone
    (`make run` has one) says nothing of whether images are processed.
    """
    global _worker_heartbeat
    amqp = getattr(getattr(sender, "app", None), "amqp", None)
    # None or empty: no -Q was given, so the worker consumes every queue.
    consumed = amqp.queues.consume_from if amqp is not None else None
    if consumed:
        missing = [name for name in settings.IMAGE_QUEUES if name not in consumed]
        if len(missing) == len(settings.IMAGE_QUEUES):
            return
        if missing:
            # A -Q written before uploads had a queue of their own: they would wait for
            # another worker, or for ever.
            logger.warning(
                "this worker takes images but not from %s: add it to --queues (-Q)",
                ", ".join(missing),
            )
    node = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    _worker_heartbeat = WorkerHeartbeat(node)
    _worker_heartbeat.start()


def stop_worker_heartbeat(**kwargs: Any) -> None:
    """`worker_shutdown` receiver."""
    if _worker_heartbeat is not None:
        _worker_heartbeat.stop()


# --- Probes -----------------------------------------------------------------------------


class Probe:
    """A function run in a daemon thread, waited for until a deadline at most."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(function, *args), name="parroter-probe", daemon=True
        )
        self.thread.start()

    def _run(self, function: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = function(*args)
        except Exception as exc:  # reported as the check's failure, never raised
            self.error = exc
        finally:
            self.done.set()

    def wait(self, deadline: float) -> bool:
        """True once finished; False if still running at the deadline (monotonic time)."""
        return self.done.wait(max(deadline - time.monotonic(), 0))


def in_own_connection(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run function with this thread's own database connection, closed afterwards."""

    def run(*args: Any) -> Any:
        try:
            return function(*args)
        finally:
            connections.close_all()

    return run


@dataclass
class DatabaseFacts:
    heartbeats: list[tuple[str, str, datetime]]
    schedule_folders: list[str]
    mounts: dict[str, str]


def read_database() -> DatabaseFacts:
    """One trivial query, then what the other checks need from the database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    since = timezone.now() - FORGET_WORKERS_AFTER
    heartbeats = list(
        Heartbeat.objects.filter(
            kind__in=[Heartbeat.Kind.BEAT, Heartbeat.Kind.WORKER], seen_at__gte=since
        ).values_list("kind", "name", "seen_at")
    )
    folders = []
    for raw in PeriodicTask.objects.filter(task=SWEEP_TASK, enabled=True).values_list(
        "kwargs", flat=True
    ):
        try:
            folder = json.loads(raw or "{}").get("folder")
        except (ValueError, AttributeError):
            continue
        if isinstance(folder, str) and folder:
            folders.append(folder)
    mounts = {
        name: str(detail.get("mount", ""))
        for name, detail in Heartbeat.objects.filter(kind=Heartbeat.Kind.FOLDER).values_list(
            "name", "detail"
        )
        if isinstance(detail, dict)
    }
    return DatabaseFacts(heartbeats, folders, mounts)


def ping_broker(url: str, timeout: float) -> None:
    if urlsplit(url).scheme in ("redis", "rediss", "unix"):
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return
    with kombu.Connection(url, connect_timeout=timeout) as broker:
        # No retry wait (kombu's default is 2 s): a refused connection is said at once, not
        # as a timeout of the whole check.
        broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)


@dataclass
class FolderState:
    path: str
    mount: str
    free_bytes: int


def mount_point(path: Path) -> str:
    """The deepest mount point that `path` (resolved) lies on."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        lines = []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            mounts.append(OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    if mounts:
        candidates = [m for m in mounts if path == Path(m) or path.is_relative_to(m)]
        return max(candidates, key=lambda m: len(Path(m).parts), default="/")
    # No mountinfo (not Linux): walk up until the device changes.
    current = path
    while current != current.parent and not os.path.ismount(current):
        current = current.parent
    return str(current)


def probe_folder(folder: str) -> FolderState:
    """Stat, open and measure a folder; raises OSError naming what is wrong."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    with os.scandir(path):  # readable, not just present
        pass
    usage = os.statvfs(path)
    return FolderState(str(path), mount_point(path), usage.f_bavail * usage.f_frsize)


def probe_schedule_folder(folder: str) -> FolderState:
    """probe_folder, then the checks every sweep makes of its folder (WATCH_ROOTS, MEDIA_ROOT,
    permissions): a schedule whose sweeps all fail on those is as broken as one whose folder
    is gone."""
    state = probe_folder(folder)
    from .sweeper import resolve_folder  # here: sweeper imports beat, which imports this

    resolve_folder(folder)
    return state


_folder_probes: dict[tuple[str, str], Probe] = {}
_folder_probes_lock = threading.Lock()


def folder_probe(folder: str, probe_with: Callable[[str], FolderState] = probe_folder) -> Probe:
    """A probe of folder, reusing one still hanging from an earlier check."""
    key = (probe_with.__name__, folder)
    with _folder_probes_lock:
        probe = _folder_probes.get(key)
        if probe is None or probe.done.is_set():
            probe = _folder_probes[key] = Probe(probe_with, folder)
        return probe


# --- The check --------------------------------------------------------------------------


@dataclass
class Report:
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, ok: bool, **detail: Any) -> None:
        self.checks[name] = {"ok": ok, **detail}

    @property
    def failing(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check["ok"]]

    @property
    def healthy(self) -> bool:
        return not self.failing

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "failing": self.failing,
            "checks": self.checks,
        }


def check(timeout: float | None = None) -> Report:
    """Probe the database, broker, beat, workers, folders and free disk, within timeout."""
    timeout = settings.HEALTH_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    now = timezone.now()
    report = Report()
    database = Probe(in_own_connection(read_database))
    broker_url = current_app.conf.broker_url or settings.CELERY_BROKER_URL
    broker = Probe(ping_broker, broker_url, timeout)
    probes = {
        folder: folder_probe(folder)
        for folder in (str(settings.MEDIA_ROOT), str(settings.WATCH_FOLDER))
    }

    facts: DatabaseFacts | None = None
    if not database.wait(deadline):
        report.add("database", False, error=f"no answer within {timeout:g} s")
    elif database.error is not None:
        report.add("database", False, error=describe(database.error))
    else:
        facts = database.result
        report.add("database", True)
        for folder in facts.schedule_folders:
            if folder not in probes:
                probes[folder] = folder_probe(folder, probe_schedule_folder)

    if not broker.wait(deadline):
        report.add("broker", False, error=f"no answer within {timeout:g} s")
    elif broker.error is not None:
        report.add("broker", False, error=describe(broker.error))
    else:
        report.add("broker", True)

    if facts is None:
        report.add("beat", False, error="unknown: the database did not answer")
        report.add("workers", False, error="unknown: the database did not answer")
    else:
        check_processes(report, facts.heartbeats, now)

    seen: dict[str, FolderState] = {}
    for folder, probe in probes.items():
        name = f"folder {folder}"
        if not probe.wait(deadline):
            report.add(name, False, error=f"no answer within {timeout:g} s (hung mount?)")
        elif probe.error is not None:
            report.add(name, False, error=describe(probe.error))
        else:
            seen[folder] = probe.result
    if facts is not None:
        check_mounts(report, seen, facts.mounts, deadline)
    for folder, state in seen.items():
        name = f"folder {folder}"
        free_mb = state.free_bytes // (1024 * 1024)
        if name in report.checks:
            report.checks[name]["free_mb"] = free_mb
            continue
        if free_mb < settings.MIN_FREE_MB:
            report.add(
                name,
                False,
                free_mb=free_mb,
                mount=state.mount,
                error=f"{free_mb} MB free, below MIN_FREE_MB ({settings.MIN_FREE_MB})",
            )
        else:
            report.add(name, True, free_mb=free_mb, mount=state.mount)
    return report


def check_processes(
    report: Report, heartbeats: list[tuple[str, str, datetime]], now: datetime
) -> None:
    """Beat and the workers are alive when their heartbeat is recent."""
    window = stale_after()
    beats = [seen for kind, _, seen in heartbeats if kind == Heartbeat.Kind.BEAT]
    if not beats:
        report.add("beat", False, error="beat has never recorded a tick")
    else:
        age = (now - max(beats)).total_seconds()
        detail = {"last_tick": max(beats).isoformat(), "age_seconds": round(age, 1)}
        if age > window.total_seconds():
            report.add("beat", False, error=f"no tick for {age:.0f} s", **detail)
        else:
            report.add("beat", True, **detail)
    workers = {
        name: round((now - seen).total_seconds(), 1)
        for kind, name, seen in heartbeats
        if kind == Heartbeat.Kind.WORKER
    }
    alive = sorted(name for name, age in workers.items() if age <= window.total_seconds())
    if alive:
        report.add("workers", True, alive=alive, age_seconds=workers)
    else:
        report.add("workers", False, error="no worker heartbeat", age_seconds=workers)


def check_mounts(
    report: Report, seen: dict[str, FolderState], remembered: dict[str, str], deadline: float
) -> None:
    """Fail folders found on a shallower mount than remembered; remember new and deeper ones."""
    to_remember = {}
    for folder, state in seen.items():
        before = remembered.get(state.path)
        if before == state.mount:
            continue
        if before is None or Path(state.mount).is_relative_to(before):
            to_remember[state.path] = state.mount
            continue
        report.add(
            f"folder {folder}",
            False,
            mount=state.mount,
            error=(
                f"not mounted: it was on the mount {before}, now it is on {state.mount} "
                "(if it was moved off its share on purpose, delete its heartbeat in the admin)"
            ),
        )
    if to_remember:
        Probe(in_own_connection(remember_mounts), to_remember).wait(deadline)


def remember_mounts(mounts: dict[str, str]) -> None:
    for path, mount in mounts.items():
        Heartbeat.record(Heartbeat.Kind.FOLDER, path, mount=mount)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"

"""How long the processes of `make run` live: as long as it does, and never past the next run.

Two guards, because neither is enough alone. Each child gets a parent-death signal
(PR_SET_PDEATHSIG, Linux only; a no-op elsewhere), so `kill -9` of the supervisor takes its
children down too. A child's own children (gunicorn workers, Celery pool processes) and a
child that could not act on the signal (stopped, say) are left to the second guard: the run
records itself in a pid file, marks every process it starts with a random run id in the
environment (inherited by their children), and the next run stops whatever carries the id of
a run whose supervisor is gone. The id, not a PID, decides: a PID reused by some other
process never carries it.

Framework-free: the bundled Redis uses `die_with_parent` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

# The environment variable that marks every process a run starts (and their children).
RUN_MARKER = "PARROTER_RUN"
PR_SET_PDEATHSIG = 1
# Seconds a leftover of a previous run gets between SIGTERM and SIGKILL.
STALE_GRACE = 10.0


class AlreadyRunning(RuntimeError):
    """The run recorded in the pid file is alive and still attached to whoever started it."""


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` giving the child `sig` when the thread that started it ends.

    The kernel ties the signal to the creating *thread*: start children from a thread that
    lives as long as the process (the main thread). None where prctl is not available.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    number = int(sig)

    def preexec() -> None:
        # Runs between fork and exec: nothing here may import or take a lock.
        prctl(PR_SET_PDEATHSIG, number)
        # A parent that died before prctl would never send the signal.
        if os.getppid() != parent:
            os.kill(os.getpid(), number)

    return preexec


@dataclass(frozen=True)
class RunRecord:
    """What a pid file says about the run that wrote it."""

    pid: int
    started: float
    parent: int
    parent_started: float
    marker: str

    @classmethod
    def of_this_process(cls) -> RunRecord:
        me = psutil.Process()
        parent = me.parent()
        return cls(
            pid=me.pid,
            started=me.create_time(),
            parent=parent.pid if parent is not None else 0,
            parent_started=parent.create_time() if parent is not None else 0.0,
            marker=secrets.token_hex(16),
        )


def write_record(path: Path, record: RunRecord) -> None:
    write_private(path, json.dumps(asdict(record)))


def write_private(path: Path, text: str) -> None:
    """Write a file whole (temporary file, then rename), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates it with mode 0600.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_record(path: Path) -> RunRecord | None:
    try:
        return RunRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Torn or foreign: nothing in it can be trusted to name our processes.
        return None


def remove_record(path: Path, record: RunRecord) -> None:
    """Remove the pid file if it is still this run's."""
    if read_record(path) == record:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clear_stale_run(path: Path) -> list[int]:
    """Stop whatever the run recorded in `path` left running; the PIDs stopped.

    Raises AlreadyRunning if that run is alive and attached to the terminal (or whatever)
    that started it: it is not stale, and stopping it is its owner's call. An orphaned
    supervisor (its `make` or shell was killed) is stale and stopped with the rest.
    """
    record = read_record(path)
    if record is None:
        return []
    supervisor = same_process(record.pid, record.started)
    if supervisor is not None and same_process(record.parent, record.parent_started):
        raise AlreadyRunning(
            f"Parroter is already running here (pid {record.pid}, recorded in {path}); "
            "stop it first, or give this one another INSTANCE or RUN_DIR"
        )
    leftovers = [supervisor] if supervisor is not None else []
    leftovers += marked_processes(record.marker)
    stop_processes(leftovers, STALE_GRACE)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return sorted(process.pid for process in leftovers)


def same_process(pid: int, started: float) -> psutil.Process | None:
    """The process `pid` if it is the one that started at `started`, not a reuse of its PID."""
    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) > 0.01:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return process


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries this run id."""
    found = []
    me = os.getpid()
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(RUN_MARKER) == marker:
                found.append(process)
    return found


def stop_processes(processes: list[psutil.Process], grace: float) -> None:
    """SIGTERM (and SIGCONT, for a stopped one), then SIGKILL what is left after `grace`."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
            process.resume()
    alive = wait_gone(processes, grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(alive, grace)


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited (a zombie has); the ones still alive after that."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [process for process in processes if is_alive(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def is_alive(process: psutil.Process) -> bool:
    try:
        # Not ours to reap: an exited child of another parent stays a zombie until it is.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

"""The process supervisor behind `make run`: children, their output, their end.

Each child runs in a session of its own (its whole group can be stopped at the end) and
gets SIGTERM when the supervisor dies, even by SIGKILL (`lifetime.die_with_parent`). Its
output is forwarded line by line under its name. A worker that is alive but takes no work
is restarted (the watchdog). Framework-free but for the stall query.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

from .lifetime import die_with_parent
from .sweeper import work_is_stalled

POLL_INTERVAL = 0.2
# Seconds each child gets between SIGTERM and SIGKILL. The worker's warm shutdown lets the
# images in hand finish; one killed mid-way is redelivered (acks_late) or repaired by a sweep.
STOP_TIMEOUTS = {"beat": 10.0, "web": 15.0, "worker": 30.0, "webhooks": 15.0}
# Stop the producers of work first, the consumers last: the webhooks of the images the worker
# finishes on its way out are still sent.
STOP_ORDER = ("beat", "web", "worker", "webhooks")

Writer = Callable[[str, str], None]


class Child:
    """One supervised process in its own session, its output forwarded line by line."""

    def __init__(
        self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path, write: Writer
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.cwd = cwd
        self.write = write
        self.process: subprocess.Popen[bytes] | None = None
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        # A session of its own: the terminal's Ctrl-C reaches it only through us, and its
        # whole process group (pool processes, gunicorn workers) can be killed at the end.
        # SIGTERM when we die, even by SIGKILL: it then stops its own children as usual.
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.reader = threading.Thread(
            target=self._forward, name=f"{self.name}-output", daemon=True
        )
        self.reader.start()

    def _forward(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        with self.process.stdout as stream:
            for raw in iter(stream.readline, b""):
                self.write(self.name, raw.decode("utf-8", "replace").rstrip())

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            # A stopped (frozen) process acts on SIGTERM only once continued: its group is,
            # so that it shuts down now rather than being killed after its stop timeout.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGCONT)

    def wait(self, timeout: float, hurry: threading.Event) -> bool:
        """Wait up to timeout for the process to exit; a second Ctrl-C cuts the wait short."""
        waited = 0.0
        while self.exit_code() is None and waited < timeout and not hurry.is_set():
            hurry.wait(POLL_INTERVAL)
            waited += POLL_INTERVAL
        return self.exit_code() is not None

    def restart(self, hurry: threading.Event) -> bool:
        """Stop it (SIGTERM; SIGKILL after its stop timeout) and start it again. True if it
        stopped by itself."""
        self.terminate()
        stopped = self.wait(STOP_TIMEOUTS.get(self.name, 10.0), hurry)
        self.kill_group()
        self.start()
        return stopped

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the process's group: itself and any stragglers."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=2)


class Watchdog:
    """Spots a worker that is alive and connected but no longer takes any work.

    Celery has known cases where a worker stops consuming after a broker reconnect. Work is
    "waiting" while images are pending or beat keeps sending sweeps; if no sweep or image
    has started for `window` seconds meanwhile, the worker is restarted.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.since = time.monotonic()
        self.next_check = self.since + min(10.0, window / 2)

    def worker_is_stuck(self, worker: Child, beat: Child | None) -> bool:
        now = time.monotonic()
        if now < self.next_check or now - self.since < self.window:
            return False
        self.next_check = now + min(10.0, self.window / 2)
        beat_running = beat is not None and beat.exit_code() is None
        return worker.exit_code() is None and work_is_stalled(
            timedelta(seconds=self.window), beat_running
        )

    def restarted(self) -> None:
        self.since = time.monotonic()


class Supervisor:
    """Starts the children, watches them until asked to stop or one dies, then stops all.

    `also_watched` are other processes whose death ends the run too (the bundled Redis),
    each as a function returning its exit code, or None while it runs.
    """

    def __init__(
        self,
        children: list[Child],
        say: Writer,
        stopping: threading.Event,
        hurry: threading.Event,
        *,
        stall_seconds: float,
        also_watched: Mapping[str, Callable[[], int | None]] | None = None,
    ) -> None:
        self.children = children
        self.say = say
        self.stopping = stopping
        self.hurry = hurry
        self.stall_seconds = stall_seconds
        self.also_watched = dict(also_watched or {})

    def start(self) -> None:
        for child in self.children:
            child.start()
            self.say("run", f"started {child.name} (pid {child.pid})")

    def watch(self, stop_reason: Callable[[], str]) -> tuple[str, int] | None:
        """Until `stopping` is set or a process dies; then stop every child.

        Returns the name and exit code of a process that died on its own, else None.
        """
        dead: tuple[str, int] | None = None
        try:
            watchdog = Watchdog(self.stall_seconds)
            by_name = {child.name: child for child in self.children}
            while not self.stopping.wait(POLL_INTERVAL):
                dead = self.first_dead()
                if dead is not None:
                    break
                worker = by_name.get("worker")
                if worker is not None and watchdog.worker_is_stuck(worker, by_name.get("beat")):
                    self.say(
                        "run",
                        f"the worker completed nothing for {self.stall_seconds:g} s while "
                        "work waited (connected but not consuming?); restarting it",
                    )
                    if worker.restart(self.hurry):
                        self.say("run", "the worker stopped; started a new one")
                    else:
                        timeout = STOP_TIMEOUTS.get("worker", 10.0)
                        self.say(
                            "run",
                            f"the worker did not stop within {timeout:g} s; killed it and "
                            "started a new one",
                        )
                    watchdog.restarted()
        finally:
            if dead is not None:
                self.say("run", f"{dead[0]} {describe_exit(dead[1])} on its own; stopping the rest")
            elif self.stopping.is_set():
                self.say("run", f"stopping ({stop_reason() or 'requested'})")
            self.stop_children()
        return dead

    def first_dead(self) -> tuple[str, int] | None:
        """The name and exit code of the first watched process that has exited, if any."""
        for child in self.children:
            code = child.exit_code()
            if code is not None:
                return child.name, code
        for name, exit_code in self.also_watched.items():
            code = exit_code()
            if code is not None:
                return name, code
        return None

    def stop_children(self) -> None:
        by_name = {child.name: child for child in self.children}
        for name in STOP_ORDER:
            child = by_name.get(name)
            if child is None or child.process is None:
                continue
            child.terminate()
            if not child.wait(STOP_TIMEOUTS[name], self.hurry):
                self.say("run", f"{name} did not stop in time; killing it")
            child.kill_group()


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def follow(path: Path, stop: threading.Event, write: Writer) -> None:
    """Forward the lines appended to a log file until stop is set and the end is reached."""
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError:
        return
    pending = b""
    with handle:
        while True:
            pending += handle.readline()
            # A line is forwarded once complete: the server may be half way through writing it.
            if pending.endswith(b"\n") or (pending and stop.is_set()):
                write("redis", pending.decode("utf-8", "replace").rstrip())
                pending = b""
            elif stop.is_set():
                return
            else:
                stop.wait(POLL_INTERVAL)

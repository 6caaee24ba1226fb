"""Real Celery worker and beat processes for integration tests, against the test database."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

BASE_DIR = Path(settings.BASE_DIR)


def wait_for(
    condition: Callable[[], object], timeout: float = 60, interval: float = 0.2, what: str = ""
) -> object:
    """Poll until condition() is truthy; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


def database_url() -> str:
    """The test database, as a DATABASE_URL another process can open."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(params['NAME']).resolve()}"
    credentials = quote(params["USER"] or "")
    if params["PASSWORD"]:
        credentials += ":" + quote(params["PASSWORD"])
    host = params["HOST"] or "127.0.0.1"
    port = f":{params['PORT']}" if params["PORT"] else ""
    return f"postgres://{credentials}@{host}{port}/{quote(params['NAME'])}"


class Processes:
    """Starts worker/beat subprocesses with one environment; stops whatever is left."""

    def __init__(self, log_dir: Path, environment: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.environment = environment
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *arguments: str, app: str = "project") -> subprocess.Popen[bytes]:
        """A celery command (worker, beat) of the given app."""
        return self.spawn(name, [sys.executable, "-m", "celery", "-A", app, *arguments])

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Any command, in its own session, its output in `<name>.log`."""
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command,
            cwd=BASE_DIR,
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.running[name] = process
        return process

    def worker(
        self, name: str = "worker", concurrency: int = 2, app: str = "project"
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            "worker",
            "--loglevel=INFO",
            f"--concurrency={concurrency}",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
            app=app,
        )

    def beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        return self.start(
            name,
            "beat",
            "--loglevel=INFO",
            f"--pidfile={self.log_dir / (name + '.pid')}",
            f"--schedule={self.log_dir / (name + '-schedule')}",
        )

    def manage(self, *arguments: str) -> subprocess.Popen[bytes]:
        """Run a manage.py command with the same environment, in the background."""
        return subprocess.Popen(
            [sys.executable, "manage.py", *arguments],
            cwd=BASE_DIR,
            env=self.environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (a worker and its pool children)."""
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name, process in list(self.running.items()):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=15)
            # Pool children left behind by a killed parent.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            self.running.pop(name, None)

    def logs(self) -> str:
        return "\n".join(
            f"===== {path.name}\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )

"""`manage.py run` (what `make run` runs): all of Parroter in the foreground.

Clears what a killed previous run left, migrates, finds the broker (BROKER_URL, or Redis:
REDIS_URL, a local one, or the bundled one), creates the first admin, then supervises the
web server, a Celery worker and Celery beat, prefixing their output, until Ctrl-C, SIGTERM or
a child dies. `--only worker` (or beat, or web) runs just that against the configured broker
and database: how another host joins.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.broker import BrokerUnavailable, broker_version, choose_broker, is_amqp
from jobs.lifetime import (
    RUN_MARKER,
    AlreadyRunning,
    RunRecord,
    clear_stale_run,
    die_with_parent,
    remove_record,
    write_private,
    write_record,
)
from jobs.redis_server import DEFAULT_ADDRESS, DEFAULT_ADDRESS_ENV, RedisServer, redact
from jobs.sweep import work_is_stalled

POLL_INTERVAL = 0.2
REDIS_WAIT_NOTICE = 5.0
# Seconds each child gets between SIGTERM and SIGKILL. The worker's warm shutdown lets the
# images in hand finish; one killed mid-way is redelivered (acks_late) or repaired by a sweep.
STOP_TIMEOUTS = {"beat": 10.0, "web": 15.0, "worker": 30.0}
# Stop the producers of work first, the consumer last.
STOP_ORDER = ("beat", "web", "worker")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ROLES = ("web", "worker", "beat")

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

    def wait(self, timeout: float, hurry: threading.Event) -> bool:
        """Wait up to timeout for the process to exit; a second Ctrl-C cuts the wait short."""
        waited = 0.0
        while self.exit_code() is None and waited < timeout and not hurry.is_set():
            hurry.wait(POLL_INTERVAL)
            waited += POLL_INTERVAL
        return self.exit_code() is not None

    def restart(self, hurry: threading.Event) -> None:
        self.terminate()
        self.wait(STOP_TIMEOUTS.get(self.name, 10.0), hurry)
        self.kill_group()
        self.start()

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


class Command(BaseCommand):
    help = "Run Parroter in the foreground: migrate, broker, web server, Celery worker and beat."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--port", type=int, default=settings.PORT, help="Web server port (default $PORT)."
        )
        parser.add_argument("--no-web", action="store_true", help="Do not start the web server.")
        parser.add_argument("--no-beat", action="store_true", help="Do not start Celery beat.")
        parser.add_argument(
            "--only",
            action="append",
            choices=ROLES,
            help=(
                "Run only this (repeatable), against the configured BROKER_URL or REDIS_URL "
                "and the already migrated database: how another host adds a worker."
            ),
        )
        parser.add_argument(
            "--celery-app",
            default="project",
            help="Celery app module for the worker and beat (default: project).",
        )

    def handle(
        self,
        *args: object,
        port: int,
        no_web: bool,
        no_beat: bool,
        only: list[str] | None,
        celery_app: str,
        **options: object,
    ) -> None:
        self.output_lock = threading.Lock()
        self.stopping = threading.Event()
        self.hurry = threading.Event()
        self.stop_signal = ""
        if only:
            roles = [role for role in ROLES if role in only]
        else:
            roles = [role for role in ROLES if not (role == "web" and no_web)]
            roles = [role for role in roles if not (role == "beat" and no_beat)]
        previous = {signum: signal.signal(signum, self.on_signal) for signum in STOP_SIGNALS}
        try:
            self.run(port=port, roles=roles, joining=bool(only), app=celery_app)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping.is_set():
            self.hurry.set()
        self.stop_signal = signal.Signals(signum).name
        self.stopping.set()

    def say(self, name: str, text: str) -> None:
        # If our own output is gone (a closed pipe), children must still be drained or block.
        with self.output_lock, contextlib.suppress(OSError):
            self.stdout.write(f"{name:<6} | {text}")
            self.stdout.flush()

    def run(self, *, port: int, roles: list[str], joining: bool, app: str) -> None:
        """Run `roles`; `joining`: only those, against a broker and database already set up."""
        suffix = "." + "-".join(roles) if joining else ""
        pid_file = Path(settings.RUN_DIR) / f"{settings.INSTANCE}{suffix}.pid"
        try:
            cleared = clear_stale_run(pid_file)
        except AlreadyRunning as exc:
            raise CommandError(str(exc)) from None
        if cleared:
            self.say(
                "run",
                f"stopped {len(cleared)} process(es) left running by a previous run "
                f"(pids {', '.join(map(str, cleared))})",
            )
        record = RunRecord.of_this_process()
        # Every process started from here on carries it, and so do their children.
        os.environ[RUN_MARKER] = record.marker
        write_record(pid_file, record)
        try:
            self.run_recorded(port=port, roles=roles, joining=joining, app=app)
        finally:
            remove_record(pid_file, record)

    def run_recorded(self, *, port: int, roles: list[str], joining: bool, app: str) -> None:
        host = os.environ.get("DJANGO_BIND", "").strip() or "127.0.0.1"
        web = "web" in roles
        if web:
            check_port_free(host, port)
        broker_url, server = self.wait_for_broker(settings.BROKER_WAIT, joining)
        tail_stop = threading.Event()
        tail = None
        url_file = Path(settings.BROKER_URL_FILE)
        try:
            if server is not None:
                tail = threading.Thread(
                    target=follow, args=(server.log_path, tail_stop, self.say), daemon=True
                )
                tail.start()
            self.describe_broker(broker_url, server, joining)
            if not joining:
                # For `celery -A project status`, Flower and `manage.py sweep` in another
                # shell: settings read it when neither BROKER_URL nor REDIS_URL is set.
                write_private(url_file, broker_url + "\n")
                call_command("migrate", interactive=False, verbosity=0)
                self.ensure_admin()
            for folder in (settings.WATCH_FOLDER, settings.MEDIA_ROOT):
                Path(folder).mkdir(parents=True, exist_ok=True)
            if self.stopping.is_set():
                return
            with tempfile.TemporaryDirectory(prefix="parroter-run-") as scratch:
                env = {
                    **os.environ,
                    "BROKER_URL": broker_url,
                    # Explicit, so that every child agrees on it whatever its settings derive.
                    "INSTANCE": settings.INSTANCE,
                    "PORT": str(port),
                    "PYTHONUNBUFFERED": "1",
                    "DJANGO_SETTINGS_MODULE": os.environ.get(
                        "DJANGO_SETTINGS_MODULE", "project.settings"
                    ),
                }
                commands = child_commands(host, port, Path(scratch), roles=roles, app=app)
                children = [
                    Child(name, command, env, Path(settings.BASE_DIR), self.say)
                    for name, command in commands.items()
                ]
                self.supervise(children, server, admin_url(host, port) if web else None)
        finally:
            if not joining:
                with contextlib.suppress(OSError):
                    if url_file.read_text().strip() == broker_url:
                        url_file.unlink()
            if server is not None:
                server.stop()
                tail_stop.set()
                if tail is not None:
                    tail.join(timeout=2)
                self.say("redis", f"stopped bundled Redis (pid {server.pid})")

    def wait_for_broker(self, patience: float, joining: bool) -> tuple[str, RedisServer | None]:
        """The broker to use, retried for `patience` seconds: it may still be starting.

        A joining host uses the configured broker and never starts one: a bundled Redis
        there would be a broker of its own that no other host sees.
        """
        if joining and not (
            os.environ.get("BROKER_URL", "").strip()
            or os.environ.get("REDIS_URL", "").strip()
            or Path(settings.BROKER_URL_FILE).exists()
        ):
            raise CommandError(
                "--only needs the shared broker: set BROKER_URL (or REDIS_URL) as on the first host"
            )
        deadline = time.monotonic() + patience
        said = 0.0
        while True:
            try:
                if joining:
                    broker_version(settings.BROKER_URL)
                    return settings.BROKER_URL, None
                return choose_broker(os.environ)
            except BrokerUnavailable as exc:
                if time.monotonic() >= deadline or self.stopping.is_set():
                    raise CommandError(str(exc)) from None
                if time.monotonic() - said >= REDIS_WAIT_NOTICE:
                    left = deadline - time.monotonic()
                    self.say("run", f"{exc}; waiting for it ({left:.0f} s more)")
                    said = time.monotonic()
                self.stopping.wait(1)

    def supervise(
        self, children: list[Child], server: RedisServer | None, admin: str | None
    ) -> None:
        dead: tuple[str, int] | None = None
        try:
            for child in children:
                child.start()
                self.say("run", f"started {child.name} (pid {child.pid})")
            if admin:
                self.say("run", f"admin: {admin}")
            self.say("run", f"watching {settings.WATCH_FOLDER}")
            self.say("run", "press Ctrl-C to stop")
            watchdog = Watchdog(settings.STALL_SECONDS)
            while not self.stopping.wait(POLL_INTERVAL):
                dead = first_dead(children, server)
                if dead is not None:
                    break
                by_name = {child.name: child for child in children}
                worker = by_name.get("worker")
                if worker is not None and watchdog.worker_is_stuck(worker, by_name.get("beat")):
                    self.say(
                        "run",
                        f"the worker completed nothing for {settings.STALL_SECONDS} s while "
                        "work waited (connected but not consuming?); restarting it",
                    )
                    worker.restart(self.hurry)
                    watchdog.restarted()
        finally:
            if dead is not None:
                self.say("run", f"{dead[0]} {describe_exit(dead[1])} on its own; stopping the rest")
            elif self.stopping.is_set():
                self.say("run", f"stopping ({self.stop_signal or 'requested'})")
            self.stop_children(children)
        if dead is not None:
            raise CommandError(f"{dead[0]} {describe_exit(dead[1])} unexpectedly")
        self.say("run", "stopped")

    def stop_children(self, children: list[Child]) -> None:
        by_name = {child.name: child for child in children}
        for name in STOP_ORDER:
            child = by_name.get(name)
            if child is None or child.process is None:
                continue
            child.terminate()
            if not child.wait(STOP_TIMEOUTS[name], self.hurry):
                self.say("run", f"{name} did not stop in time; killing it")
            child.kill_group()

    def describe_broker(self, url: str, server: RedisServer | None, joining: bool) -> None:
        try:
            version = broker_version(url)
        except BrokerUnavailable:
            version = "?"
        name = "broker" if is_amqp(url) else "redis"
        configured = os.environ.get("BROKER_URL", "").strip() or os.environ.get("REDIS_URL")
        if server is not None:
            self.say(
                "redis",
                f"started bundled {version} at {redact(url)} (pid {server.pid}); "
                "it stops with Parroter and keeps no data",
            )
        elif not (configured or joining):
            address = os.environ.get(DEFAULT_ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS
            self.say(
                "redis",
                f"REDIS_URL is unset: reusing the {version} found at {address}; instance "
                f"{settings.INSTANCE} keeps its keys and queues apart from others there",
            )
        else:
            self.say(name, f"using {version} at {redact(url)}")
        self.say(
            name,
            f"instance {settings.INSTANCE}: queues {settings.IMAGE_QUEUE}, {settings.SWEEP_QUEUE}",
        )

    def ensure_admin(self) -> None:
        """Create the first superuser: from DJANGO_SUPERUSER_* or "admin" with a new password."""
        users = get_user_model()
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "").strip()
        if username:
            if users.objects.filter(username=username).exists():
                return
        else:
            if users.objects.filter(is_superuser=True).exists():
                return
            username = "admin"
            if users.objects.filter(username=username).exists():
                self.say(
                    "run",
                    'no superuser exists and the user "admin" is not one; '
                    "create one with manage.py createsuperuser",
                )
                return
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "")
        if password:
            users.objects.create_superuser(username=username, email=email, password=password)
            self.say("run", f'created superuser "{username}" from DJANGO_SUPERUSER_USERNAME')
            return
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(username=username, email=email, password=password)
        self.say(
            "run",
            f'created superuser "{username}" with password {password} '
            "(shown this once: write it down or change it in the admin)",
        )


def child_commands(
    host: str, port: int, scratch: Path, *, roles: Sequence[str], app: str = "project"
) -> dict[str, list[str]]:
    """The command line of each child, by name, in start order."""
    python = sys.executable
    commands: dict[str, list[str]] = {}
    if "web" in roles:
        commands["web"] = [
            python, "-m", "gunicorn", "project.wsgi:application",
            "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "--threads", "4",
            "--graceful-timeout", "10",
            "--access-logfile", "-",
            "--error-logfile", "-",
            # Its default control socket sits in ~/.gunicorn, shared by every instance.
            "--no-control-socket",
        ]  # fmt: skip
    if "worker" in roles:
        # A node name of its own per process, so that `celery status` sees every worker of
        # every host apart (no DuplicateNodenameWarning, even with one hostname everywhere).
        node = f"{settings.INSTANCE}-{secrets.token_hex(4)}@%h"
        commands["worker"] = [
            python, "-m", "celery", "-A", app, "worker", "-l", "info",
            "--concurrency", str(settings.WORKER_CONCURRENCY),
            "--hostname", node,
        ]  # fmt: skip
    if "beat" in roles:
        # The schedule lives in the database (DatabaseScheduler); the file is beat's
        # bookkeeping only, kept out of the project.
        commands["beat"] = [
            python, "-m", "celery", "-A", app, "beat", "-l", "info",
            "--pidfile=", "--schedule", str(scratch / "celerybeat-schedule"),
        ]  # fmt: skip
    return commands


def first_dead(children: list[Child], server: RedisServer | None) -> tuple[str, int] | None:
    """The name and exit code of the first supervised process that has exited, if any."""
    for child in children:
        code = child.exit_code()
        if code is not None:
            return child.name, code
    if server is not None and not server.is_running():
        return "redis", server.process.returncode
    return None


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the web server will: a port in TIME_WAIT from the last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "stop what uses it or choose another with PORT=... or --port"
            ) from None


def admin_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/admin/" if ":" in host else f"http://{host}:{port}/admin/"


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

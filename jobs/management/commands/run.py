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
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
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
    remove_record,
    write_private,
    write_record,
)
from jobs.redis_server import DEFAULT_ADDRESS, DEFAULT_ADDRESS_ENV, RedisServer, redact
from jobs.supervisor import Child, Supervisor, describe_exit, follow

REDIS_WAIT_NOTICE = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ROLES = ("web", "worker", "beat")
# Seconds between two looks at whether the process that started the run is still there.
PARENT_CHECK = 0.5
# Webhooks sent at once by the webhook worker (threads: each one mostly waits on a socket).
WEBHOOK_THREADS = 4


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
            "--with-parent",
            action="store_true",
            help=(
                "Stop once the process that started this one is gone (`make run` passes it, "
                "so that make killed outright takes its run along); without it a run started "
                "with nohup outlives its shell."
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
        with_parent: bool,
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
            self.run(
                port=port, roles=roles, joining=bool(only), app=celery_app, with_parent=with_parent
            )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping.is_set():
            self.hurry.set()
        self.stop_signal = signal.Signals(signum).name
        self.stopping.set()

    def stop_when_orphaned(self, parent: int) -> None:
        """Stop, as on SIGTERM, once the process that started the run (make, a shell) is gone.

        Killed outright, it sends no signal; its run would go on unseen, holding the port,
        until the next run stops it as stale (lifetime.clear_stale_run).
        """
        while not self.stopping.wait(PARENT_CHECK):
            if os.getppid() != parent:
                self.stop_signal = f"the process that started it (pid {parent}) is gone"
                self.stopping.set()

    def say(self, name: str, text: str) -> None:
        # If our own output is gone (a closed pipe), children must still be drained or block.
        with self.output_lock, contextlib.suppress(OSError):
            self.stdout.write(f"{name:<6} | {text}")
            self.stdout.flush()

    def run(
        self, *, port: int, roles: list[str], joining: bool, app: str, with_parent: bool = False
    ) -> None:
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
        if with_parent:
            threading.Thread(
                target=self.stop_when_orphaned, args=(record.parent,), daemon=True
            ).start()
        try:
            self.run_recorded(port=port, roles=roles, joining=joining, app=app)
        finally:
            remove_record(pid_file, record)

    def run_recorded(self, *, port: int, roles: list[str], joining: bool, app: str) -> None:
        host = settings.DJANGO_BIND
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
                supervisor = Supervisor(
                    children,
                    self.say,
                    self.stopping,
                    self.hurry,
                    stall_seconds=settings.STALL_SECONDS,
                    also_watched={"redis": server.exit_code} if server is not None else {},
                )
                supervisor.start()
                if web:
                    self.say("run", f"admin: {admin_url(host, port)}")
                if "beat" in commands:
                    # Beat's sweeps (and its inotify watch) are what watch the folder.
                    self.say("run", f"watching {settings.WATCH_FOLDER}")
                self.say("run", "press Ctrl-C to stop")
                dead = supervisor.watch(lambda: self.stop_signal)
                if dead is not None:
                    name, code = dead
                    raise CommandError(f"{name} {describe_exit(code)} unexpectedly")
                self.say("run", "stopped")
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
            f"instance {settings.INSTANCE}: queues "
            + ", ".join((*settings.IMAGE_QUEUES, settings.SWEEP_QUEUE))
            + (f", {settings.WEBHOOK_QUEUE}" if settings.WEBHOOK_URLS else ""),
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
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "")
        if os.environ.get("DJANGO_SUPERUSER_PASSWORD", ""):
            # Django's own command reads DJANGO_SUPERUSER_PASSWORD and validates the fields.
            call_command(
                "createsuperuser", interactive=False, username=username, email=email, verbosity=0
            )
            self.say("run", f'created superuser "{username}" from DJANGO_SUPERUSER_USERNAME')
            return
        # No password given: make one and show it once, which createsuperuser cannot do.
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
        if settings.WEBHOOK_URLS:
            # Webhooks get a worker of their own: a receiver that hangs holds one of its
            # threads for up to the send's time limit, never a pool process images need.
            queues = ",".join((*settings.IMAGE_QUEUES, settings.SWEEP_QUEUE))
            commands["worker"] += ["--queues", queues]
            commands["webhooks"] = [
                python, "-m", "celery", "-A", app, "worker", "-l", "info",
                "--queues", settings.WEBHOOK_QUEUE,
                "--pool", "threads", "--concurrency", str(WEBHOOK_THREADS),
                "--hostname", f"{settings.INSTANCE}-webhooks-{secrets.token_hex(4)}@%h",
            ]  # fmt: skip
    if "beat" in roles:
        # The schedule lives in the database (DatabaseScheduler); the file is beat's
        # bookkeeping only, kept out of the project.
        commands["beat"] = [
            python, "-m", "celery", "-A", app, "beat", "-l", "info",
            "--pidfile=", "--schedule", str(scratch / "celerybeat-schedule"),
        ]  # fmt: skip
    return commands


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

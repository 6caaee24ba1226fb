"""The bundled Redis and the choice of which Redis to use, with real redis-server processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psutil
import pytest
import redis

from jobs import redis_server
from jobs.redis_server import (
    RedisServer,
    RedisUnavailable,
    ensure_redis,
    free_port,
    redact,
    redis_version,
    start_bundled_redis,
    version_tuple,
)


@pytest.fixture
def bundled() -> Iterator[RedisServer]:
    with start_bundled_redis() as server:
        yield server


@pytest.fixture
def someone_elses() -> Iterator[RedisServer]:
    """A Redis without a password, as one found already running on a machine would be."""
    with start_bundled_redis(password="") as server:
        yield server


def ping(url: str) -> bool:
    with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
        return bool(client.ping())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.integration
def test_start_bundled_redis_answers_ping_and_stops_by_pid() -> None:
    server = start_bundled_redis()
    try:
        assert server.url.startswith(f"redis://:{server.password}@127.0.0.1:")
        assert ping(server.url)
        assert version_tuple(redis_version(server.url)) >= (6, 2)
        assert server.directory.is_dir()
        assert psutil.Process(server.pid).is_running()
    finally:
        server.stop()
    assert gone(server.pid)
    assert not server.directory.exists()
    server.stop()  # a second stop is harmless


@pytest.mark.integration
def test_start_bundled_redis_keeps_no_data(bundled: RedisServer) -> None:
    with redis.Redis.from_url(bundled.url) as client:
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("dir")["dir"] == str(bundled.directory.resolve())


@pytest.mark.integration
def test_start_bundled_redis_uses_the_port_given() -> None:
    port = free_port()
    with start_bundled_redis(port) as server:
        assert server.port == port
        assert server.url.endswith(f"@127.0.0.1:{port}/0")
        assert ping(server.url)


@pytest.mark.integration
def test_start_bundled_redis_requires_a_password_no_local_user_can_see(
    bundled: RedisServer,
) -> None:
    with pytest.raises(redis.AuthenticationError):
        ping(f"redis://127.0.0.1:{bundled.port}/0")
    with pytest.raises(redis.AuthenticationError):
        ping(f"redis://:wrong@127.0.0.1:{bundled.port}/0")
    assert ping(bundled.url)
    assert len(bundled.password) >= 24
    # Not on its command line (every local user can read /proc/PID/cmdline) ...
    assert bundled.password not in " ".join(psutil.Process(bundled.pid).cmdline())
    # ... but in a file in a directory only we may enter.
    assert bundled.directory.stat().st_mode & 0o077 == 0
    assert bundled.password not in repr(bundled)
    assert redact(bundled.url) == f"redis://:***@127.0.0.1:{bundled.port}/0"


@pytest.mark.integration
def test_start_bundled_redis_each_server_gets_its_own_password() -> None:
    with start_bundled_redis() as first, start_bundled_redis() as second:
        assert first.password != second.password
        with pytest.raises(redis.AuthenticationError):
            ping(f"redis://:{first.password}@127.0.0.1:{second.port}/0")


@pytest.mark.integration
def test_start_bundled_redis_on_a_taken_port_says_why(bundled: RedisServer) -> None:
    with pytest.raises(RedisUnavailable, match="Address already in use"):
        start_bundled_redis(bundled.port)
    assert ping(bundled.url)


@pytest.mark.integration
def test_start_bundled_redis_context_manager_stops_it() -> None:
    with start_bundled_redis() as server:
        pid = server.pid
    assert gone(pid)


@pytest.mark.integration
def test_ensure_redis_unreachable_redis_url_fails_fast_in_one_line() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as caught:
        ensure_redis({"REDIS_URL": url})
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("REDIS_URL redis://:***@127.0.0.1:")
    assert "not reachable" in message
    assert "hunter2" not in message
    assert "\n" not in message


@pytest.mark.integration
def test_ensure_redis_uses_redis_url_as_given(bundled: RedisServer) -> None:
    url, server = ensure_redis({"REDIS_URL": bundled.url, "PARROTER_DEFAULT_REDIS": "x:1"})
    assert url == bundled.url
    assert server is None


@pytest.mark.integration
def test_ensure_redis_reuses_a_running_default_redis_without_owning_it(
    someone_elses: RedisServer,
) -> None:
    url, server = ensure_redis({"PARROTER_DEFAULT_REDIS": f"127.0.0.1:{someone_elses.port}"})
    assert url == f"redis://127.0.0.1:{someone_elses.port}/0"
    assert server is None
    assert someone_elses.is_running()


@pytest.mark.integration
def test_ensure_redis_starts_the_bundled_redis_when_none_answers() -> None:
    closed = f"127.0.0.1:{free_port()}"
    url, server = ensure_redis({"PARROTER_DEFAULT_REDIS": closed})
    assert server is not None
    try:
        assert url == server.url
        assert closed not in url
        assert ping(url)
    finally:
        server.stop()
    assert gone(server.pid)


@pytest.mark.integration
def test_ensure_redis_starts_the_bundled_redis_when_the_default_is_too_old(
    someone_elses: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = someone_elses
    default = f"redis://127.0.0.1:{bundled.port}/0"
    real_version = redis_server.redis_version

    def version(url: str, timeout: float = 1.0) -> str:
        return "5.0.7" if url == default else real_version(url, timeout)

    monkeypatch.setattr(redis_server, "redis_version", version)
    url, server = ensure_redis({"PARROTER_DEFAULT_REDIS": f"127.0.0.1:{bundled.port}"})
    assert server is not None
    try:
        assert url != default
        assert ping(url)
    finally:
        server.stop()
    assert bundled.is_running()


@pytest.mark.integration
def test_ensure_redis_ignores_a_default_port_that_is_not_redis() -> None:
    # Something listens there but never answers: the probe times out and moves on.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url, server = ensure_redis({"PARROTER_DEFAULT_REDIS": f"127.0.0.1:{port}"})
    assert server is not None
    server.stop()
    assert url == server.url


def test_version_tuple_compares_numerically() -> None:
    assert version_tuple("6.2.14") >= (6, 2)
    assert version_tuple("10.0") > version_tuple("6.2.0")
    assert version_tuple("6.0.9") < (6, 2)
    assert version_tuple("7.2.rc1") == (7, 2, 0)


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://user:secret@host:6379/1") == "redis://user:***@host:6379/1"
    assert redact("redis://:secret@host/0") == "redis://:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"

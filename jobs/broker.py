"""Talking to the broker, Redis or RabbitMQ: which one `make run` uses, and what waits in it.

Messages are published by Celery (`jobs.tasks`); this module only asks the broker questions,
each with a short timeout, and answers "unknown" rather than raise when it cannot be asked.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import amqp.exceptions
import kombu
import kombu.exceptions
import redis
from celery import current_app
from django.conf import settings

from .redis_server import RedisServer, RedisUnavailable, ensure_redis, redact, redis_version

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0
# What a broker that cannot be asked raises through kombu, py-amqp or redis-py.
UNREACHABLE = (
    OSError,
    kombu.exceptions.KombuError,
    amqp.exceptions.AMQPError,
    redis.RedisError,
)


class BrokerUnavailable(RuntimeError):
    """No usable broker: the message is one line an operator can act on."""


@dataclass(frozen=True)
class QueueState:
    """Messages ready in a queue, and taken by workers but not yet acknowledged."""

    waiting: int | None
    # Redis keeps unacknowledged messages in a hash of their own; RabbitMQ tells only its
    # management API, so None there.
    in_flight: int | None
    error: str = ""


def is_amqp(url: str) -> bool:
    return urlsplit(url).scheme in settings.AMQP_SCHEMES


def queue_state(queue: str | None = None, *, timeout: float = PROBE_TIMEOUT) -> QueueState:
    """How many messages wait in `queue` of this instance (default: the image queues,
    folder images and uploads, summed).

    Redis: LLEN of the queue's list, through kombu's own client, so the instance's key prefix
    is applied as when publishing. RabbitMQ: the message count of a passive queue declare (a
    queue never declared holds nothing). A broker that does not answer within `timeout`
    gives waiting=None and says why in `error`.

    A connection to Redis is kept for the next question (see _KeptConnections): every
    sweep asks.
    """
    app = current_app
    names = (queue,) if queue else settings.IMAGE_QUEUES
    url = app.conf.broker_url
    amqp_broker = is_amqp(url)
    # Redis only: py-amqp does not reconnect a kept connection by itself.
    connection = None if amqp_broker else _kept.take(url, timeout)
    try:
        if connection is None:
            options = (
                {"read_timeout": timeout, "write_timeout": timeout}
                if amqp_broker
                else {"socket_timeout": timeout, "socket_connect_timeout": timeout}
            )
            connection = app.connection_for_read(connect_timeout=timeout, transport_options=options)
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
        state = _read_state(connection, names, amqp_broker)
    except BaseException as exc:
        # A kept one too: redis-py reconnects by itself to a broker that restarted since,
        # so this one is down or does not answer. The next question connects anew.
        if connection is not None:
            connection.close()
        if isinstance(exc, UNREACHABLE):
            return _unanswered(url, names, exc)
        raise
    if amqp_broker:
        connection.close()
    else:
        _kept.put(url, timeout, connection)
    return state


def _read_state(
    connection: kombu.Connection, names: tuple[str, ...], amqp_broker: bool
) -> QueueState:
    if amqp_broker:
        return QueueState(sum(_declared_length(connection, name) for name in names), None)
    # Celery sends no message priorities, so every message is in the plain list.
    channel: Any = connection.default_channel  # kombu's Redis channel
    client = channel.client
    # kombu prefixes the key of the commands it uses itself (HLEN), not HVALS.
    unacked = getattr(client, "global_keyprefix", "") + channel.unacked_key
    return QueueState(
        sum(int(client.llen(name)) for name in names),
        _taken(client.hvals(unacked), names),
    )


def _unanswered(url: str, names: tuple[str, ...], exc: Exception) -> QueueState:
    shown = ", ".join(names)
    logger.warning("cannot read the length of queue %r at %s: %s", shown, redact(url), exc)
    return QueueState(None, None, f"the broker at {redact(url)} did not answer: {exc}")


class _KeptConnections(threading.local):
    """A Redis connection per process and thread, kept from one queue_state to the next.

    A new connection for each question cost a sweep task 1.3 of its 5.9 ms on SQLite
    (connect, AUTH, kombu's PING, redis-py reading its own version from the package's
    metadata for CLIENT SETINFO), and a sweep asks every SWEEP_INTERVAL. Kept per thread
    (a kombu connection is not thread-safe) and per process: one inherited across a fork
    shares its socket with the parent, so the child forgets it without closing it. One
    asked with another URL or timeout replaces it.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.key: tuple[str, float] | None = None
        self.connection: kombu.Connection | None = None

    def take(self, url: str, timeout: float) -> kombu.Connection | None:
        if self.pid != os.getpid():
            self.pid, self.connection = os.getpid(), None
        connection, self.connection = self.connection, None
        if connection is not None and self.key != (url, timeout):
            connection.close()
            return None
        return connection

    def put(self, url: str, timeout: float, connection: kombu.Connection) -> None:
        self.key, self.connection = (url, timeout), connection


_kept = _KeptConnections()


def _declared_length(connection: kombu.Connection, name: str) -> int:
    """Messages ready in an AMQP queue. A channel of its own: a queue never declared closes
    the channel that asked (NOT_FOUND), and holds nothing."""
    channel = connection.channel()
    try:
        _, waiting, _ = channel.queue_declare(queue=name, passive=True)
        return int(waiting)
    except amqp.exceptions.NotFound:
        return 0
    finally:
        channel.close()


def _taken(unacked: list[bytes], queues: tuple[str, ...]) -> int:
    """How many of kombu's unacknowledged messages (the values of its Redis hash, each
    `[message, exchange, routing key]`) are of `queues`: every queue's share that hash, and
    a sweep running counts its own message there."""
    taken = 0
    for value in unacked:
        try:
            routing_key = json.loads(value)[2]
        except (ValueError, IndexError, TypeError):
            continue
        taken += routing_key in queues
    return taken


def queue_length(queue: str | None = None, *, timeout: float = PROBE_TIMEOUT) -> int | None:
    """Messages waiting in `queue` (default: the image queues), None if the broker is silent."""
    return queue_state(queue, timeout=timeout).waiting


def broker_version(url: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Connect once: "Redis 7.0.15", "RabbitMQ 3.10.8"; BrokerUnavailable if it cannot."""
    try:
        if not is_amqp(url):
            return f"Redis {redis_version(url, timeout)}"
        with kombu.Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
            server = connection.connection.server_properties
            product, version = server.get("product", "AMQP broker"), server.get("version", "")
            return f"{product} {version}".strip()
    except UNREACHABLE as exc:
        raise BrokerUnavailable(f"{redact(url)} is not reachable: {one_line(exc)}") from None


def choose_broker(environ: Mapping[str, str]) -> tuple[str, RedisServer | None]:
    """The broker URL `make run` uses, and the Redis it started for it (None if it did not).

    BROKER_URL, when set, names the broker (Redis or RabbitMQ), which must answer; nothing is
    started and Redis is not needed at all. Otherwise Redis, as `ensure_redis` finds it:
    REDIS_URL, a Redis already on 127.0.0.1:6379, or the bundled one.
    """
    if url := environ.get("BROKER_URL", "").strip():
        try:
            broker_version(url)
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"BROKER_URL {exc}") from None
        return url, None
    try:
        return ensure_redis(environ)
    except RedisUnavailable as exc:
        raise BrokerUnavailable(str(exc)) from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

"""The broker seen from Parroter: queue lengths under the instance's key prefix, and two
instances sharing one Redis database without touching each other's work."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from django.conf import settings

from jobs.broker import queue_length, queue_state
from jobs.models import Image
from jobs.redis_server import start_bundled_redis
from jobs.tasks import queue_images

from .conftest import image_bytes
from .processes import BASE_DIR, Processes, wait_for

pytestmark = pytest.mark.integration


def test_queue_length_counts_this_instances_prefixed_list_only(broker):
    queue_images([1, 2, 3])  # real messages, published as a sweep does
    raw = redis.Redis.from_url(broker.url)
    assert raw.llen(f"{settings.INSTANCE}:{settings.IMAGE_QUEUE}") == 3
    assert not raw.exists(settings.IMAGE_QUEUE)
    # Namesakes outside this instance's prefix: another app, another instance.
    raw.rpush(settings.IMAGE_QUEUE, "x", "y")
    raw.rpush(f"elsewhere:{settings.IMAGE_QUEUE}", "z")

    assert queue_length() == 3
    assert queue_length(settings.SWEEP_QUEUE) == 0
    assert queue_state() == queue_state(settings.IMAGE_QUEUE)
    assert queue_state().in_flight == 0


def test_queue_state_counts_the_messages_taken_from_its_own_queue_only(broker):
    from project.celery import app

    queue_images([1, 2, 3])
    app.send_task("jobs.recover", queue=settings.SWEEP_QUEUE)  # what a running sweep holds
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        # Taken as a worker takes them, not yet acknowledged (acks_late).
        taken = [channel.basic_get(settings.IMAGE_QUEUE, no_ack=False) for _ in range(2)]
        taken.append(channel.basic_get(settings.SWEEP_QUEUE, no_ack=False))
        assert all(taken)
        assert queue_state() == queue_state(settings.IMAGE_QUEUE)
        assert (queue_state().waiting, queue_state().in_flight) == (1, 2)
        sweeps = queue_state(settings.SWEEP_QUEUE)
        assert (sweeps.waiting, sweeps.in_flight) == (0, 1)
        for message in taken:
            message.ack()
    assert queue_state().in_flight == 0


def test_uploads_have_a_queue_of_their_own_counted_with_the_image_queue(broker):
    from project.celery import app

    queue_images([1, 2, 3], uploaded={2})
    assert queue_length(settings.IMAGE_QUEUE) == 2
    assert queue_length(settings.UPLOAD_QUEUE) == 1
    with app.connection_for_write() as connection:
        upload = connection.default_channel.basic_get(settings.UPLOAD_QUEUE, no_ack=False)
        assert upload.payload == [
            [2],
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
        # Image messages, wherever they wait: what the lost-message check weighs against
        # the pending images, and what /metrics and the dashboard show.
        assert (queue_state().waiting, queue_state().in_flight) == (2, 1)
        upload.ack()


def test_queue_length_is_none_when_redis_does_not_answer_and_keeps_its_password_out(broker):
    broker.stop()
    state = queue_state(timeout=0.5)
    assert state.waiting is None
    assert f"redis://:***@127.0.0.1:{broker.port}/0" in state.error
    assert broker.password not in state.error
    assert queue_length(timeout=0.5) is None


def connections_received(url: str) -> int:
    """Connections the Redis at `url` accepted so far, this question's own among them."""
    return int(redis.Redis.from_url(url).info("stats")["total_connections_received"])


def test_queue_state_asks_again_on_the_connection_it_kept(broker):
    queue_images([1, 2])
    assert queue_length() == 2
    before = connections_received(broker.url)
    assert [queue_length() for _ in range(5)] == [2] * 5
    # The second connections_received's own, none for the questions.
    assert connections_received(broker.url) - before == 1


def test_queue_state_answers_again_once_redis_restarted(broker):
    queue_images([1])
    assert queue_length() == 1
    broker.stop()
    assert queue_length(timeout=0.5) is None
    with start_bundled_redis(broker.port, password=broker.password):
        assert queue_length() == 0, "a restarted Redis without persistence holds nothing"
        queue_images([1, 2, 3])
        assert queue_length() == 3


def test_queue_state_in_a_forked_child_does_not_use_its_parents_connection(broker):
    queue_state()
    before = connections_received(broker.url)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's own exit code tells)
        os._exit(0 if queue_length() == 0 else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child connected on its own (and the parent's socket answered nobody but it).
    assert connections_received(broker.url) - before == 2
    assert queue_length() == 0


def sqlite_rows(path: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.django_db(transaction=True)
def test_two_instances_on_one_redis_database_take_only_their_own_work(
    system, folders, redis_server, tmp_path, drop
):
    # Instance B: its own database, folders and name; the same Redis URL, database 0.
    other = tmp_path / "b"
    for folder in ("watch", "media"):
        (other / folder).mkdir(parents=True)
    database = other / "b.sqlite3"
    environment_b = {
        **system.environment,
        "INSTANCE": "instance-b",
        "DATABASE_URL": f"sqlite:///{database}",
        "WATCH_FOLDER": str(other / "watch"),
        "WATCH_ROOTS": str(other),
        "MEDIA_ROOT": str(other / "media"),
    }
    migrated = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=BASE_DIR,
        env=environment_b,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    (tmp_path / "logs-b").mkdir()
    system_b = Processes(tmp_path / "logs-b", environment_b)
    try:
        # The same node name on purpose: the clash the issue saw, now in separate instances.
        for processes in (system, system_b):
            processes.worker("worker")
            processes.beat()
        for index in range(3):
            drop(folders["watch"], f"a{index}.jpg", image_bytes(colour=(index * 50, 0, 0)))
            drop(other / "watch", f"b{index}.jpg", image_bytes(colour=(0, index * 50, 0)))

        def done_b() -> list[tuple]:
            return sqlite_rows(database, "select name from jobs_image where status = 'done'")

        wait_for(
            lambda: Image.objects.filter(status=Image.Status.DONE).count() == 3,
            timeout=90,
            what="instance A's images",
        )
        wait_for(lambda: len(done_b()) == 3, timeout=90, what="instance B's images")
        assert sorted(Image.objects.values_list("name", flat=True)) == [
            "a0.jpg",
            "a1.jpg",
            "a2.jpg",
        ]
        assert sorted(sqlite_rows(database, "select name from jobs_image")) == [
            ("b0.jpg",),
            ("b1.jpg",),
            ("b2.jpg",),
        ]

        # No message of one reached the other's worker.
        tasks_a = set(Image.objects.values_list("task_id", flat=True))
        tasks_b = {row[0] for row in sqlite_rows(database, "select task_id from jobs_image")}
        log_a = (system.log_dir / "worker.log").read_text()
        log_b = (system_b.log_dir / "worker.log").read_text()
        received_a = set(re.findall(r"jobs\.make_thumbnails\[(\S+)\] received", log_a))
        received_b = set(re.findall(r"jobs\.make_thumbnails\[(\S+)\] received", log_b))
        assert received_a == tasks_a
        assert received_b == tasks_b
        assert not tasks_a & tasks_b

        # Every key in the shared database belongs to one instance or the other.
        keys = {key.decode() for key in redis.Redis.from_url(redis_server.url).keys("*")}
        prefixes = (f"{settings.INSTANCE}:", "instance-b:")
        assert keys
        assert [key for key in keys if not key.startswith(prefixes)] == []
        assert {prefix for prefix in prefixes if any(k.startswith(prefix) for k in keys)} == set(
            prefixes
        )

        # Each instance's `celery status` sees its own worker only.
        for environment in (system.environment, environment_b):
            status = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "project", "status", "--timeout", "3"],
                cwd=BASE_DIR,
                env=environment,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert "1 node online" in status.stdout, status.stdout + status.stderr
            assert "DuplicateNodename" not in status.stdout + status.stderr
    finally:
        system_b.stop_all()

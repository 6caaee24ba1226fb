"""The Celery queues: each bound to an exchange and routing key of its own, on a real Redis;
uploads served beside a folder's backlog, not behind it."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import states
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django_celery_results.models import TaskResult

from jobs import sweeper
from jobs.broker import queue_length
from jobs.models import Image
from jobs.tasks import queue_images
from project.celery import app as celery_app

from .conftest import image_bytes
from .processes import Processes, wait_for


def test_queues_each_have_their_own_exchange_and_routing_key():
    queues = celery_app.amqp.queues
    assert {settings.IMAGE_QUEUE, settings.SWEEP_QUEUE} <= set(queues)
    for name, queue in queues.items():
        assert (queue.exchange.name, queue.routing_key) == (name, name)


def test_queues_a_message_sent_to_a_queues_exchange_lands_in_that_queue_only(broker):
    # A periodic task's exchange and routing key options address a queue this way.
    with celery_app.connection_for_write() as connection:
        for queue in celery_app.amqp.queues.values():
            queue(connection.default_channel).declare()
    for queue in celery_app.amqp.queues.values():
        celery_app.send_task(
            "jobs.recover", exchange=queue.exchange.name, routing_key=queue.routing_key
        )
    # Counted under this instance's key prefix, as the workers read them.
    for name in celery_app.amqp.queues:
        assert queue_length(name) == 1, name


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_scheduled_tasks_left_waiting_past_their_next_run_are_dropped_not_run(system, broker):
    # Beat sends a sweep a second; no worker takes them for a few seconds (stopped, busy).
    system.environment.update({"SWEEP_INTERVAL": "1", "WATCH_EVENTS": "false"})
    system.beat()
    # Beat's start sends the recovery and retention too (they expire much later): with six
    # messages waiting, at least four are sweeps a second apart, and three of them older
    # than the one second a sweep may wait, whenever the worker gets to them.
    wait_for(lambda: (queue_length(settings.SWEEP_QUEUE) or 0) >= 6, what="a backlog of sweeps")
    system.worker()
    # Each expired before the next was due: the worker drops it, and says so in its result.
    wait_for(
        lambda: (
            TaskResult.objects.filter(task_name="jobs.sweep_folder", status=states.REVOKED).count()
            >= 3
        ),
        what="the waiting sweeps dropped as expired",
    )


def upload_among_a_backlog(
    processes: Processes, client: Client, folders: dict[str, Path], drop: Callable[..., Path]
) -> tuple[int, int]:
    """Queue a folder's backlog of ninety images and start a worker with one pool process;
    once it is under way, upload one image. Returns how many of the backlog were done when
    the upload was queued, and when the upload was done."""
    for index in range(BACKLOG):
        # Each its own content (a duplicate would never be done): JPEG merges close colours.
        colour = (index * 4 % 256, 10 + index // 64 * 80, 10)
        drop(folders["watch"], f"{index}.jpg", image_bytes((800, 600), colour=colour))
    backlog = sweeper.sweep_folder(str(folders["watch"]), ["64x64"]).to_queue
    assert len(backlog) == BACKLOG
    queue_images(backlog)
    # Ready before the worker starts: between the first image done and the upload, a fast
    # machine gets through many more.
    client.force_login(User.objects.create_user("alice"))
    photo = io.BytesIO(image_bytes((400, 300), colour=(10, 200, 10)))
    photo.name = "upload.jpg"
    processes.worker(concurrency=1)
    done = Image.objects.filter(source=Image.Source.FOLDER, status=Image.Status.DONE)
    wait_for(done.exists, what="the backlog under way")
    response = client.post(reverse("jobs:upload"), {"images": [photo], "sizes": "64x64"})
    assert response.status_code == 201, response.content
    done_when_uploaded = done.count()
    upload = Image.objects.get(source=Image.Source.UPLOAD)
    wait_for(
        lambda: Image.objects.get(id=upload.id).status == Image.Status.DONE,
        what="the upload done",
    )
    upload.refresh_from_db()
    wait_for(lambda: done.count() == BACKLOG, what="the backlog done")
    return done_when_uploaded, done.filter(finished_at__lt=upload.finished_at).count()


BACKLOG = 90


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_an_upload_is_done_beside_a_folders_backlog_not_after_it(
    system, broker, client, folders, drop
):
    when_uploaded, before_upload = upload_among_a_backlog(system, client, folders, drop)
    assert when_uploaded < BACKLOG - 30, ("the upload came too late to test", when_uploaded)
    # Behind the backlog it would wait for all of it. In a queue of its own it waits for the
    # image being processed and the one the worker had taken: kombu's round robin on Redis
    # asks the upload queue first once an image was taken from the other.
    assert before_upload <= when_uploaded + 2, (when_uploaded, before_upload)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_given_queues_without_the_upload_queue_says_so(system):
    # A -Q written for a version before uploads had a queue of their own.
    system.start(
        "worker",
        "worker",
        "--loglevel=INFO",
        f"--queues={settings.IMAGE_QUEUE},{settings.SWEEP_QUEUE}",
    )
    wait_for(
        lambda: f"this worker takes images but not from {settings.UPLOAD_QUEUE}" in system.logs(),
        what="the worker's warning",
    )

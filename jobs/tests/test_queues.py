"""The Celery queues: each bound to an exchange and routing key of its own, on a real Redis."""

from __future__ import annotations

import pytest
from celery import states
from django.conf import settings
from django_celery_results.models import TaskResult

from jobs.broker import queue_length
from project.celery import app as celery_app

from .processes import wait_for


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

"""RabbitMQ as the broker (BROKER_URL=amqp://...): publishers and the queue probe, for real.

Worker and beat run as processes; the web view and `manage.py sweep` publish to a RabbitMQ
virtual host of the test's own. `make run` on RabbitMQ is in test_run.py.
"""

from __future__ import annotations

import io

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.urls import reverse

from jobs.broker import queue_length, queue_state
from jobs.models import Image

from .conftest import celery_broker, image_bytes
from .processes import wait_for
from .test_queues import BACKLOG, upload_among_a_backlog

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# For the queue probes: a busy machine's RabbitMQ may take longer than the default second
# to open a connection, and the probe would say None.
ANSWER_WITHIN = 10


@pytest.fixture
def on_rabbitmq(system, amqp_url):
    """The system fixture's processes, and this process's Celery app, on a RabbitMQ vhost."""
    system.environment["BROKER_URL"] = amqp_url
    with celery_broker(amqp_url):
        yield system


def statuses() -> dict[str, str]:
    return dict(Image.objects.values_list("name", "status"))


def test_rabbitmq_upload_publishes_to_amqp_and_a_worker_takes_it(
    on_rabbitmq, folders, client, redis_server
):
    client.force_login(User.objects.create_user("alice"))
    photo = io.BytesIO(image_bytes((400, 300)))
    photo.name = "upload.jpg"
    response = client.post(reverse("jobs:upload"), {"images": [photo], "sizes": "64x64"})
    assert response.status_code == 201, response.content
    # No worker yet: the message waits in RabbitMQ, in this instance's upload queue, counted
    # with the image queue that nothing declared yet.
    assert queue_length(settings.UPLOAD_QUEUE, timeout=ANSWER_WITHIN) == 1
    assert queue_length(timeout=ANSWER_WITHIN) == 1
    assert queue_length(settings.SWEEP_QUEUE, timeout=ANSWER_WITHIN) == 0

    on_rabbitmq.worker()
    wait_for(lambda: statuses() == {"upload.jpg": "done"}, timeout=60, what="the upload")
    assert Image.objects.get().thumbnails == {"64x64": [64, 48]}
    assert queue_length(timeout=ANSWER_WITHIN) == 0
    # REDIS_URL names a live Redis all along: nothing used it.
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0
    assert "transport:   amqp://guest:**@127.0.0.1:5672/parroter-test-" in on_rabbitmq.logs()


def test_rabbitmq_manage_sweep_publishes_and_queue_length_counts_the_messages(
    on_rabbitmq, folders, drop
):
    on_rabbitmq.environment["SETTLE_SECONDS"] = "0"
    for index in range(3):
        drop(folders["watch"], f"{index}.jpg", image_bytes(colour=(index * 60, 10, 10)))
    sweep = on_rabbitmq.manage("sweep", "--no-wait")
    output = sweep.communicate(timeout=60)[0].decode()
    assert sweep.returncode == 0, output
    assert "3 new" in output
    assert queue_length(timeout=ANSWER_WITHIN) == 3
    assert queue_state(timeout=ANSWER_WITHIN).in_flight is None  # RabbitMQ does not say over AMQP
    # A queue nobody declared holds nothing.
    assert queue_length("parroter.nobody.images", timeout=ANSWER_WITHIN) == 0

    on_rabbitmq.worker()
    on_rabbitmq.beat()
    wait_for(
        lambda: sorted(statuses().values()) == ["done"] * 3, timeout=60, what="the three images"
    )
    assert queue_length(timeout=ANSWER_WITHIN) == 0


def test_rabbitmq_queue_length_is_none_when_the_broker_does_not_answer(rabbitmq):
    with celery_broker("amqp://guest:secret@127.0.0.1:1//"):
        state = queue_state(timeout=0.5)
    assert state.waiting is None
    assert "amqp://guest:***@127.0.0.1:1//" in state.error
    assert "secret" not in state.error


def test_rabbitmq_serves_an_upload_beside_a_folders_backlog(on_rabbitmq, client, folders, drop):
    when_uploaded, before_upload = upload_among_a_backlog(on_rabbitmq, client, folders, drop)
    assert when_uploaded < BACKLOG - 30, ("the upload came too late to test", when_uploaded)
    # RabbitMQ gives each free place in the worker's prefetch to one of the queues holding a
    # message, at random: the upload waits for a few images (1 to 6 in ten runs here), never
    # for the rest of the backlog.
    assert before_upload <= when_uploaded + 20, (when_uploaded, before_upload)

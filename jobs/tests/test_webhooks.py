"""Webhooks against a real HTTP server on loopback: signature, retries, exactly one delivery.

Unit tests call `webhooks.deliver` and `webhooks.repair` directly; the integration tests
run real workers and beat (conftest.system), one of them with a pool process killed at the
worst moments (fault_app).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.urls import reverse
from django.utils import timezone

from jobs import outcomes, retention, sweeper, uploads, webhooks
from jobs.broker import queue_length
from jobs.models import Image, Sweep, WebhookDelivery
from jobs.tasks import make_thumbnails

from .conftest import image_bytes, image_row
from .processes import wait_for

SECRET = "webhook-test-secret"  # noqa: S105
FAULT_APP = "jobs.tests.fault_app"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers as scripted."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        # Status codes for the next answers, in order; 200 once they run out.
        self.codes: list[int] = []
        # Headers sent with every answer (Retry-After, say).
        self.headers: dict[str, str] = {}
        self.delay = 0.0
        # The body of every answer; None: "answer <code>".
        self.answer: bytes | None = None
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((dict(self.headers), body))
                    code = receiver.codes.pop(0) if receiver.codes else 200
                time.sleep(receiver.delay)
                try:
                    self.send_response(code)
                    if 300 <= code < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Type", "text/plain")
                    for name, value in receiver.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(receiver.answer or f"answer {code}".encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up waiting: what a timeout test wants

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> Counter[tuple[int, str]]:
        """How many POSTs each (image or sweep id, event) got."""
        with self.lock:
            bodies = [json.loads(body) for _, body in self.requests]
        return Counter(
            ((body.get("image") or body["sweep"])["id"], body["event"]) for body in bodies
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def assert_signed(headers: dict[str, str], body: bytes) -> None:
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Parroter-Signature"], f"sha256={expected}")


def finished_image(index: int = 1, status: str = Image.Status.DONE, **fields) -> Image:
    """An image row moved to a final state the way processing does it."""
    return image_row(index, status, finished_at=timezone.now(), **fields)


def owe(image: Image, event: str = webhooks.IMAGE_DONE) -> list[WebhookDelivery]:
    with transaction.atomic():
        webhooks.record(image, event)
    return list(WebhookDelivery.objects.filter(image=image))


# --- Recording ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_record_owes_nothing_without_a_webhook_url(settings):
    settings.WEBHOOK_URLS = []
    assert owe(finished_image()) == []


@pytest.mark.django_db
def test_record_owes_one_delivery_per_url_once_per_run(settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    image = finished_image(archive="archives/1.zip")
    with transaction.atomic():
        webhooks.record(image, webhooks.IMAGE_DONE)
        webhooks.record(image, webhooks.IMAGE_DONE)  # the same transition, recorded again
    deliveries = WebhookDelivery.objects.filter(image=image).order_by("url")
    assert [d.url for d in deliveries] == settings.WEBHOOK_URLS
    assert {d.status for d in deliveries} == {WebhookDelivery.Status.PENDING}
    body = json.loads(deliveries[0].body)
    assert body["event"] == "image.done"
    assert body["image"] == {
        "id": image.id,
        "name": "1.jpg",
        "folder": "/in",
        "status": "done",
        "archive": "archives/1.zip",
        "sha256": image.sha256,
        "sizes": ["64x64"],
        "error": "",
        "duplicate_of": None,
        "finished_at": body["image"]["finished_at"],
    }
    # Reprocessed and done again: a new run, so a new event.
    Image.objects.filter(id=image.id).update(finished_at=timezone.now() + timedelta(seconds=1))
    owe(image)
    assert WebhookDelivery.objects.filter(image=image).count() == 4


@pytest.mark.django_db
def test_processing_records_done_duplicate_and_failed_events(folders, drop, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    photo = image_bytes((300, 200))
    drop(folders["watch"], "first.jpg", photo)
    drop(folders["watch"], "again.jpg", photo)
    drop(folders["watch"], "broken.jpg", b"not an image")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    for name in ("first.jpg", "again.jpg", "broken.jpg"):
        assert not WebhookDelivery.objects.filter(event="sweep.finished").exists()
        make_thumbnails(Image.objects.get(name=name).id)
    bodies = {
        delivery.image.name: json.loads(delivery.body)
        for delivery in WebhookDelivery.objects.exclude(image=None).select_related("image")
    }
    first = Image.objects.get(name="first.jpg")
    assert bodies["first.jpg"]["event"] == "image.done"
    assert bodies["first.jpg"]["image"]["archive"] == first.archive
    assert bodies["first.jpg"]["image"]["sha256"] == hashlib.sha256(photo).hexdigest()
    assert bodies["again.jpg"]["event"] == "image.duplicate"
    assert bodies["again.jpg"]["image"]["duplicate_of"] == first.id
    assert bodies["again.jpg"]["image"]["archive"] == first.archive, "the zip holding it"
    assert bodies["broken.jpg"]["event"] == "image.failed"
    assert "not an image" in bodies["broken.jpg"]["image"]["error"]
    assert len(bodies) == 3
    # With the last of its images final, the sweep's digest.
    digest = WebhookDelivery.objects.get(event="sweep.finished")
    assert digest.sweep_id == record.id
    body = json.loads(digest.body)["sweep"]
    assert body["images"] == {"total": 3, "done": 1, "failed": 1, "duplicate": 1}
    broken = Image.objects.get(name="broken.jpg")
    assert body["failed"] == [{"id": broken.id, "name": "broken.jpg", "error": broken.error}]
    assert (body["id"], body["folder"], body["sizes"]) == (record.id, record.folder, ["64x64"])
    assert (
        body["last_image_finished_at"]
        == max(image.finished_at for image in Image.objects.all()).isoformat()
    )


@pytest.mark.django_db
def test_a_sweep_is_told_of_once_even_when_its_images_are_reprocessed(folders, drop, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    drop(folders["watch"], "photo.jpg")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    image = Image.objects.get()
    make_thumbnails(image.id)
    assert WebhookDelivery.objects.filter(sweep=record).count() == 2, "one per URL"
    image.refresh_from_db()
    assert uploads.claim_again([image], ["32x32"]).queued == [image.id]
    make_thumbnails(image.id)
    assert WebhookDelivery.objects.filter(sweep=record).count() == 2
    assert WebhookDelivery.objects.filter(image=image, event="image.done").count() == 4


@pytest.mark.django_db
def test_webhook_events_choose_what_is_recorded(folders, drop, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    settings.WEBHOOK_EVENTS = ["image.failed", "sweep.finished"]
    drop(folders["watch"], "good.jpg")
    drop(folders["watch"], "broken.jpg", b"not an image")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    for image in Image.objects.all():
        make_thumbnails(image.id)
    assert sorted(WebhookDelivery.objects.values_list("event", flat=True)) == [
        "image.failed",
        "sweep.finished",
    ]


def test_an_unknown_webhook_event_stops_start_up():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        env={**os.environ, "WEBHOOK_EVENTS": "image.done,image.finished"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "WEBHOOK_EVENTS names unknown events ['image.finished']" in result.stderr


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
    reason="concurrent writers: SQLite lets only one write at a time",
)
@pytest.mark.django_db(transaction=True)
def test_the_last_two_images_of_a_sweep_finishing_at_once_send_one_digest(settings):
    """Both final states are written before either transaction commits: without the lock
    on the sweep row, each would see the other still open and no digest would be owed."""
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    sweep = Sweep.objects.create(trigger=Sweep.Trigger.MANUAL, folder="/in", sizes=["64x64"])
    images = [
        finished_image(index, status=Image.Status.PROCESSING, sweep=sweep) for index in (1, 2)
    ]
    both_written = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def finish(image: Image) -> None:
        try:
            with transaction.atomic():
                Image.objects.filter(id=image.id).update(status=Image.Status.DONE)
                both_written.wait()
                outcomes.image_finished(image)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=finish, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert WebhookDelivery.objects.filter(event="sweep.finished", sweep=sweep).count() == 1
    assert WebhookDelivery.objects.filter(event="image.done").count() == 2


@pytest.mark.django_db
def test_reconcile_records_the_failure_of_a_poison_file(folders, drop, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    settings.MAX_ATTEMPTS = 1
    drop(folders["watch"], "poison.jpg")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    image = Image.objects.get()
    Image.objects.start(image.id, "task", worker="elsewhere:1")
    Image.objects.filter(id=image.id).update(lease_until=Now() - timedelta(seconds=1))
    sweeper.reconcile(folders["watch"])
    delivery = WebhookDelivery.objects.get(image=image)
    assert delivery.event == "image.failed"
    assert "1 times" in json.loads(delivery.body)["image"]["error"]


# --- Delivering ---------------------------------------------------------------------------


@pytest.fixture
def hook(settings, receiver):
    settings.WEBHOOK_URLS = [receiver.url]
    settings.WEBHOOK_SECRET = SECRET
    settings.WEBHOOK_TIMEOUT = 5
    settings.WEBHOOK_BACKOFF = 10
    return receiver


@pytest.mark.django_db
def test_deliver_posts_the_signed_body_once_and_records_it(hook):
    [delivery] = owe(finished_image())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT
    assert webhooks.deliver(delivery.id) == "skipped", "a second message sends nothing"
    [(headers, body)] = hook.requests
    assert body == delivery.body.encode()
    assert_signed(headers, body)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Parroter-Event"] == "image.done"
    assert headers["X-Parroter-Delivery"] == str(delivery.id)
    delivery.refresh_from_db()
    assert delivery.status == WebhookDelivery.Status.SENT
    assert (delivery.attempts, delivery.response_code) == (1, 200)
    assert delivery.last_response == "answer 200"
    assert delivery.sent_at is not None


@pytest.mark.django_db
def test_deliver_sends_a_url_s_user_and_password_as_basic_auth(hook, settings):
    settings.WEBHOOK_URLS = [hook.url.replace("http://", "http://hook%40user:H00k%3Apw@")]
    [delivery] = owe(finished_image())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT
    [(headers, _)] = hook.requests
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"hook@user:H00k:pw").decode()
    assert headers["Host"] == hook.url.split("/")[2], "the credentials are no part of the host"


@pytest.mark.django_db
def test_deliver_records_an_answer_whatever_bytes_it_holds(hook):
    # PostgreSQL's text holds no NUL: a receiver's answer with one must not keep its row
    # from being recorded as sent (it would be sent again, and again, by the repair).
    hook.answer = b"ok\x00<b>\xff"
    [delivery] = owe(finished_image())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT
    delivery.refresh_from_db()
    assert delivery.status == WebhookDelivery.Status.SENT
    assert delivery.last_response == "ok\ufffd<b>\ufffd"


@pytest.mark.django_db
def test_deliver_sends_nothing_while_another_worker_holds_the_row(hook):
    [delivery] = owe(finished_image())
    WebhookDelivery.objects.filter(id=delivery.id).update(
        status=WebhookDelivery.Status.SENDING, claimed_by="elsewhere:1"
    )
    assert webhooks.deliver(delivery.id) == "skipped"
    assert hook.requests == []


@pytest.mark.django_db
@pytest.mark.parametrize("code", [400, 404, 410, 302])
def test_deliver_fails_a_refusal_without_retrying(hook, broker, code):
    hook.codes = [code]
    [delivery] = owe(finished_image())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.FAILED
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("failed", 1, code)
    assert f"answer {code}" in delivery.last_response
    assert webhooks.deliver(delivery.id) == "skipped"
    assert len(hook.requests) == 1, "no retry, and a redirect is not followed"
    assert queued_webhooks(broker) == 0


def queued_webhooks(server) -> int:
    return queue_length(settings.WEBHOOK_QUEUE) or 0


@pytest.mark.django_db
def test_deliver_retries_5xx_with_backoff_and_fails_after_its_tries(hook, broker, settings):
    settings.WEBHOOK_TRIES = 5
    codes = [500, 502, 503, 500, 500]
    hook.codes = list(codes)
    [delivery] = owe(finished_image())
    for tries in range(1, settings.WEBHOOK_TRIES):
        before = timezone.now()
        WebhookDelivery.objects.filter(id=delivery.id).update(next_try_at=before)  # due
        assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
        delivery.refresh_from_db()
        assert (delivery.attempts, delivery.response_code) == (tries, codes[tries - 1])
        assert delivery.next_try_at >= before + timedelta(seconds=10 * 2 ** (tries - 1))
        assert queued_webhooks(broker) == tries, "each retry is queued, with its countdown"
        assert webhooks.deliver(delivery.id) == "skipped", "not before its backoff"
    WebhookDelivery.objects.filter(id=delivery.id).update(next_try_at=timezone.now())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.FAILED
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_code) == ("failed", 5, 500)
    assert len(hook.requests) == settings.WEBHOOK_TRIES
    assert len({body for _, body in hook.requests}) == 1, "every try sends the same bytes"


@pytest.mark.django_db
@pytest.mark.parametrize("code", [429, 408, 503])
def test_deliver_retries_a_not_now_after_the_wait_the_receiver_asks(hook, broker, code):
    hook.codes = [code]
    hook.headers = {"Retry-After": "120"}
    [delivery] = owe(finished_image())
    before = timezone.now()
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
    delivery.refresh_from_db()
    assert delivery.response_code == code
    # Its 120 s, not the first backoff's 10.
    assert delivery.next_try_at >= before + timedelta(seconds=120)
    assert queued_webhooks(broker) == 1
    hook.headers = {}
    assert webhooks.deliver(delivery.id) == "skipped", "not before the wait it asked for"
    WebhookDelivery.objects.filter(id=delivery.id).update(next_try_at=timezone.now())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT


@pytest.mark.django_db
def test_a_receiver_down_overnight_still_gets_its_event(hook, broker, settings):
    # The default tries, backoff doubling to an hour: about 21 hours of tries.
    assert settings.WEBHOOK_TRIES == 30
    waits = [webhooks.backoff(tries) for tries in range(1, settings.WEBHOOK_TRIES)]
    assert waits[:3] == [10, 20, 40]
    assert max(waits) == webhooks.MAX_BACKOFF
    assert 20 * 3600 < sum(waits) < 24 * 3600
    # A wait longer than a message may be held goes without one: the repair sends the row
    # once it is due, and it is sent then.
    hook.codes = [503] * 12
    [delivery] = owe(finished_image())
    for _ in range(12):
        WebhookDelivery.objects.filter(id=delivery.id).update(next_try_at=timezone.now())
        assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
    delivery.refresh_from_db()
    assert delivery.attempts == 12
    assert delivery.next_try_at > timezone.now() + timedelta(minutes=59)
    messages = queued_webhooks(broker)
    assert messages == len([wait for wait in waits[:12] if wait <= webhooks.MAX_COUNTDOWN])
    assert webhooks.repair() == []
    later = delivery.next_try_at + timedelta(seconds=settings.REQUEUE_AFTER + 1)
    assert webhooks.repair(now=later) == [delivery.id]
    assert queued_webhooks(broker) == messages + 1
    # The repair ran at `later`; so does its message.
    WebhookDelivery.objects.filter(id=delivery.id).update(next_try_at=timezone.now())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT
    assert len(hook.requests) == 13


@pytest.mark.django_db
def test_send_again_gives_a_failed_delivery_a_new_series_of_tries(
    hook, broker, django_capture_on_commit_callbacks
):
    hook.codes = [404]
    [failed] = owe(finished_image(1))
    [sent] = owe(finished_image(2))
    assert webhooks.deliver(failed.id) == WebhookDelivery.Status.FAILED
    assert webhooks.deliver(sent.id) == WebhookDelivery.Status.SENT
    with django_capture_on_commit_callbacks(execute=True):
        assert webhooks.send_again([failed.id, sent.id]) == [failed.id]
    assert queued_webhooks(broker) == 1
    failed.refresh_from_db()
    assert (failed.status, failed.attempts) == (WebhookDelivery.Status.PENDING, 0)
    assert webhooks.deliver(failed.id) == WebhookDelivery.Status.SENT
    assert len(hook.requests) == 3


@pytest.mark.django_db
def test_deliver_retries_when_nothing_answers(hook, broker, settings):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings.WEBHOOK_URLS = [f"http://127.0.0.1:{port}/hook"]
    [refused] = owe(finished_image(1))
    assert webhooks.deliver(refused.id) == WebhookDelivery.Status.PENDING
    refused.refresh_from_db()
    assert "refused" in refused.last_error.lower()
    assert refused.response_code is None

    settings.WEBHOOK_URLS = [hook.url]
    settings.WEBHOOK_TIMEOUT = 0.5
    hook.delay = 2  # answers after the timeout
    [slow] = owe(finished_image(2))
    assert webhooks.deliver(slow.id) == WebhookDelivery.Status.PENDING
    slow.refresh_from_db()
    assert "timed out" in slow.last_error


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.django_db
def test_repair_queues_lost_rows_and_rows_whose_claim_expired_only(hook, broker, settings):
    settings.REQUEUE_AFTER = 60
    now = timezone.now()
    host = socket.gethostname()
    rows = {}
    for index, name in enumerate(
        ["lost", "fresh", "dead_sender", "live_sender", "far_sender", "expired", "sent"], 1
    ):
        [rows[name]] = owe(finished_image(index))
    Sending = WebhookDelivery.Status.SENDING
    WebhookDelivery.objects.filter(id=rows["lost"].id).update(
        next_try_at=now - timedelta(seconds=61)
    )
    WebhookDelivery.objects.filter(id=rows["dead_sender"].id).update(
        status=Sending, claimed_by=f"{host}:{dead_pid()}", claimed_at=now, attempts=1
    )
    WebhookDelivery.objects.filter(id=rows["live_sender"].id).update(
        status=Sending, claimed_by=f"{host}:{os.getpid()}", claimed_at=now, attempts=1
    )
    WebhookDelivery.objects.filter(id=rows["far_sender"].id).update(
        status=Sending, claimed_by="another-host:12", claimed_at=now, attempts=1
    )
    WebhookDelivery.objects.filter(id=rows["expired"].id).update(
        status=Sending, claimed_by="another-host:12", claimed_at=now - timedelta(hours=1)
    )
    WebhookDelivery.objects.filter(id=rows["sent"].id).update(
        status=WebhookDelivery.Status.SENT, next_try_at=now - timedelta(days=1)
    )

    again = webhooks.repair(now)

    assert sorted(again) == sorted(rows[name].id for name in ("lost", "expired"))
    assert queued_webhooks(broker) == 2
    status = dict(WebhookDelivery.objects.values_list("id", "status"))
    # A fresh claim is a live lease whatever its label says: a PID names no process on
    # another host or in another PID namespace.
    assert status[rows["dead_sender"].id] == Sending
    assert status[rows["live_sender"].id] == Sending
    assert status[rows["far_sender"].id] == Sending
    assert status[rows["sent"].id] == WebhookDelivery.Status.SENT
    assert webhooks.repair(now) == [], "queued rows are not queued again at once"
    for name in ("lost", "expired"):
        assert webhooks.deliver(rows[name].id) == WebhookDelivery.Status.SENT
    assert len(hook.requests) == 2


# --- With real workers --------------------------------------------------------------------


def webhook_environment(system, receiver: Receiver) -> None:
    system.environment.update(
        WEBHOOK_URL=receiver.url,
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_BACKOFF="0.3",
        # Short, since a claim left by a killed sender is taken back after its time limit.
        WEBHOOK_TIMEOUT="2",
        REQUEUE_AFTER="2",
    )


def all_sent(count: int) -> bool:
    sent = WebhookDelivery.objects.filter(status=WebhookDelivery.Status.SENT).count()
    return sent >= count and not WebhookDelivery.objects.exclude(status="sent").exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_webhook_answered_with_500s_is_sent_again_until_received(system, folders, receiver):
    webhook_environment(system, receiver)
    system.environment["WEBHOOK_EVENTS"] = "image.done"
    receiver.codes = [500, 502, 503]
    (folders["watch"] / "photo.jpg").write_bytes(image_bytes((400, 300)))
    system.worker()
    system.beat()
    wait_for(lambda: all_sent(1), timeout=90, what="the webhook to get through")
    image = Image.objects.get()
    assert image.status == Image.Status.DONE
    delivery = WebhookDelivery.objects.get()
    assert (delivery.attempts, delivery.response_code) == (4, 200)
    assert len(receiver.requests) == 4
    for headers, body in receiver.requests:
        assert_signed(headers, body)
        assert headers["X-Parroter-Delivery"] == str(delivery.id)
    assert json.loads(receiver.requests[-1][1])["image"]["archive"] == image.archive


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stage", ["webhook-recorded", "webhook-claimed"])
def test_one_post_per_event_across_a_killed_worker(system, folders, receiver, tmp_path, stage):
    """The pool process dies right after the final state is committed (before any task is
    queued), or right after claiming a delivery (before sending it); then the worker is
    stopped and a second one takes over."""
    markers = tmp_path / "markers"
    markers.mkdir()
    webhook_environment(system, receiver)
    system.environment.update(PARROTER_FAULT_DIE_AFTER=stage, PARROTER_FAULT_MARKERS=str(markers))
    photos = {
        f"{index}.jpg": image_bytes((300, 200), colour=(index * 40, 0, 0)) for index in (1, 2)
    }
    photos["copy.jpg"] = photos["1.jpg"]
    photos["broken.jpg"] = b"not an image at all"
    for name, data in photos.items():
        (folders["watch"] / name).write_bytes(data)
    first = system.worker("worker-a", app=FAULT_APP)
    system.beat()

    def died_at_every_event() -> bool:
        hit = {marker.name for marker in markers.iterdir()}
        if stage == "webhook-recorded":
            return len(hit) >= len(photos)
        final = Image.objects.filter(status__in=Image.FINAL_STATUSES).count() == len(photos)
        rows = WebhookDelivery.objects.values_list("id", flat=True)
        return final and all(f"webhook-claimed-delivery-{row}" in hit for row in rows)

    wait_for(died_at_every_event, timeout=120, what="a pool process to die at every event")
    # A warm shutdown: whatever it is sending it finishes; its unstarted messages go back.
    system.running.pop("worker-a")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    system.worker("worker-b")
    sweeps = set(Image.objects.values_list("sweep_id", flat=True))
    wait_for(
        lambda: all_sent(len(photos) + len(sweeps)), timeout=120, what="every webhook to be sent"
    )

    images = {image.name: image for image in Image.objects.all()}
    assert sorted(images) == sorted(photos)
    statuses = sorted(image.status for image in images.values())
    assert statuses == ["done", "done", "duplicate", "failed"]
    expected = {(image.id, f"image.{image.status}") for image in images.values()}
    expected |= {(sweep_id, "sweep.finished") for sweep_id in sweeps}
    assert receiver.events() == dict.fromkeys(expected, 1), "exactly one POST per event"
    # Claimed by the process that died, then again; or queued only by the repair.
    tries = 2 if stage == "webhook-claimed" else 1
    assert set(WebhookDelivery.objects.values_list("attempts", flat=True)) == {tries}
    for headers, body in receiver.requests:
        assert_signed(headers, body)


# --- Admin --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_lists_deliveries_read_only_with_a_status_filter(admin_client, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    [sent] = owe(finished_image(1))
    [failed] = owe(finished_image(2))
    WebhookDelivery.objects.filter(id=sent.id).update(status="sent", response_code=200)
    WebhookDelivery.objects.filter(id=failed.id).update(
        status="failed", response_code=404, last_error="HTTP 404 Not Found"
    )
    changelist = reverse("admin:jobs_webhookdelivery_changelist")
    page = admin_client.get(changelist + "?status__exact=failed").content.decode()
    assert "2.jpg" in page
    assert "1.jpg" not in page
    page = admin_client.get(reverse("admin:jobs_webhookdelivery_change", args=[failed.id]))
    text = page.content.decode()
    assert "HTTP 404 Not Found" in text
    assert "&quot;event&quot;: &quot;image.done&quot;" in text, "the body as sent, readable"
    assert 'name="_save"' not in text, "nothing to edit"
    add = admin_client.get(reverse("admin:jobs_webhookdelivery_add"))
    assert add.status_code == 403
    delete = admin_client.get(reverse("admin:jobs_webhookdelivery_delete", args=[failed.id]))
    assert delete.status_code == 403


@pytest.mark.django_db
def test_a_password_in_a_webhook_url_is_masked_in_the_log_and_the_admin(
    hook, admin_client, settings, caplog
):
    # Staff who may view the outbox, and whoever reads the worker's log, are not
    # necessarily trusted with the receiver's credentials.
    settings.WEBHOOK_URLS = [hook.url.replace("http://", "http://hookuser:H00k-pw@")]
    settings.WEBHOOK_TRIES = 1
    [delivery] = owe(finished_image())
    caplog.set_level("INFO", logger="jobs.webhooks")
    webhooks.deliver(delivery.id)
    assert "hookuser:***@127.0.0.1" in caplog.text
    assert "H00k-pw" not in caplog.text
    changelist = reverse("admin:jobs_webhookdelivery_changelist")
    change = reverse("admin:jobs_webhookdelivery_change", args=[delivery.id])
    for page in (changelist, change):
        text = admin_client.get(page).content.decode()
        assert "hookuser:***@127.0.0.1" in text
        assert "H00k-pw" not in text
    # Nor can a search find the password out, a character at a time.
    found = admin_client.get(changelist, {"q": "hookuser:H00k"}).content.decode()
    assert change not in found


@pytest.mark.django_db
def test_admin_links_a_digest_to_its_sweep(admin_client, settings):
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    sweep = Sweep.objects.create(trigger=Sweep.Trigger.MANUAL, folder="/in", sizes=["64x64"])
    finished_image(1, sweep=sweep)
    with transaction.atomic():
        webhooks.record_sweep_finished(sweep.id)
    digest = WebhookDelivery.objects.get(event="sweep.finished")
    page = admin_client.get(reverse("admin:jobs_webhookdelivery_changelist")).content.decode()
    sweep_page = reverse("admin:jobs_sweep_change", args=[sweep.id])
    assert f'<a href="{sweep_page}">sweep #{sweep.id}</a>' in page
    detail = admin_client.get(reverse("admin:jobs_webhookdelivery_change", args=[digest.id]))
    assert "&quot;total&quot;: 1" in detail.content.decode()


@pytest.mark.django_db
def test_admin_sends_a_failed_delivery_again(
    hook, broker, admin_client, django_capture_on_commit_callbacks
):
    hook.codes = [404]
    [failed] = owe(finished_image(1))
    assert webhooks.deliver(failed.id) == WebhookDelivery.Status.FAILED
    changelist = reverse("admin:jobs_webhookdelivery_changelist")
    assert "Send selected deliveries again" in admin_client.get(changelist).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            changelist, {"action": "send_again", "_selected_action": [failed.id]}, follow=True
        )
    assert "1 delivery(ies) queued to be sent again" in response.content.decode()
    assert queued_webhooks(broker) == 1
    assert webhooks.deliver(failed.id) == WebhookDelivery.Status.SENT


@pytest.mark.django_db
def test_a_sweep_is_told_of_once_even_after_retention_forgot_its_digest(folders, drop, settings):
    """A sweep is told of once, also when WEBHOOK_KEEP_DAYS has forgotten its digest's
    delivery by the time one of its images is reprocessed."""
    settings.WEBHOOK_URLS = ["http://127.0.0.1:9/hook"]
    settings.WEBHOOK_KEEP_DAYS = 30
    drop(folders["watch"], "a.jpg")
    drop(folders["watch"], "b.jpg", b"not an image")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    for image in Image.objects.all():
        make_thumbnails(image.id)
    assert WebhookDelivery.objects.filter(sweep=record).count() == 1
    # The digest was sent, 31 days ago; retention forgets it as documented.
    WebhookDelivery.objects.update(
        status=WebhookDelivery.Status.SENT, created_at=timezone.now() - timedelta(days=31)
    )
    assert retention.apply_retention().webhook_deliveries == 3
    # An operator reprocesses the one good image with other sizes.
    image = Image.objects.get(name="a.jpg")
    assert uploads.claim_again([image], ["32x32"]).queued == [image.id]
    make_thumbnails(image.id)
    assert WebhookDelivery.objects.filter(image=image, event="image.done").count() == 1
    digests = WebhookDelivery.objects.filter(sweep=record, event="sweep.finished")
    assert digests.count() == 0, [json.loads(d.body) for d in digests]


@pytest.mark.django_db
def test_a_second_message_does_not_cut_the_backoff_short(hook, broker, settings):
    """Two messages for one row (repair of a row whose message sits in a busy queue longer
    than REQUEUE_AFTER, or "send again" of a pending row): the second, coming before the
    row is due again, sends nothing, so the tries keep their backoff."""
    settings.REQUEUE_AFTER = 60
    hook.codes = [503] * 10
    [delivery] = owe(finished_image())
    # Its first message is stuck behind a backlog: the repair queues another one.
    WebhookDelivery.objects.filter(id=delivery.id).update(
        next_try_at=timezone.now() - timedelta(seconds=61)
    )
    assert webhooks.repair() == [delivery.id]
    # The two messages arrive a moment apart.
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
    delivery.refresh_from_db()
    assert delivery.next_try_at > timezone.now() + timedelta(seconds=9)
    webhooks.deliver(delivery.id)
    assert len(hook.requests) == 1, (
        f"{len(hook.requests)} POSTs within a second; next try was due at "
        f"{delivery.next_try_at:%H:%M:%S}"
    )


class RawReceiver:
    """A TCP server answering every request with the same raw bytes, then closing."""

    def __init__(self, answer: bytes) -> None:
        import socket
        import threading

        self.answer = answer
        self.requests = 0
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                conn.sendall(self.answer)


@pytest.mark.django_db
def test_an_answer_that_is_not_http_is_tried_again_and_recorded(broker, settings):
    # A URL naming the wrong port: something answers, but not in HTTP.
    raw = RawReceiver(b"SSH-2.0-OpenSSH_9.6\r\n")
    settings.WEBHOOK_URLS = [raw.url]
    settings.WEBHOOK_TIMEOUT = 2
    [delivery] = owe(finished_image())
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
    delivery.refresh_from_db()
    assert raw.requests == 1
    assert (delivery.status, delivery.attempts) == (WebhookDelivery.Status.PENDING, 1)
    assert delivery.last_error.startswith("no valid answer: BadStatusLine")


@pytest.mark.django_db
def test_migration_marks_finished_sweeps_only():
    import importlib

    from django.apps import apps

    from .conftest import image_row

    migration = importlib.import_module("jobs.migrations.0012_mark_finished_sweeps")
    finished = Sweep.objects.create(trigger="manual", folder="/in")
    open_ = Sweep.objects.create(trigger="manual", folder="/in")
    empty = Sweep.objects.create(trigger="manual", folder="/in")
    image_row(1, Image.Status.DONE, sweep=finished)
    image_row(2, Image.Status.FAILED, sweep=finished)
    image_row(3, Image.Status.DONE, sweep=open_)
    image_row(4, Image.Status.PENDING, sweep=open_)
    migration.mark_finished_sweeps(apps, None)
    marked = set(Sweep.objects.exclude(digest_owed_at=None).values_list("id", flat=True))
    assert marked == {finished.id}, (empty.id, open_.id)


@pytest.mark.django_db
def test_a_webhook_worker_whose_clock_is_behind_still_sends(hook, broker, settings, monkeypatch):
    # The row is made, and later repaired, on a host whose clock is right; the webhook
    # worker's own clock is 10 s behind (a host not yet synchronised). Its due check also
    # asks the database's clock, so no row waits for ever.
    hook.codes = [503, 200]
    [delivery] = owe(finished_image())
    right = timezone.now
    behind = lambda: right() - timedelta(seconds=10)  # noqa: E731

    monkeypatch.setattr(webhooks.timezone, "now", behind)
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.PENDING
    monkeypatch.setattr(webhooks.timezone, "now", right)
    # Its retry's message is lost; the repair, on a host with the right clock, sends it again.
    WebhookDelivery.objects.filter(id=delivery.id).update(
        next_try_at=right() - timedelta(seconds=settings.REQUEUE_AFTER + 1)
    )
    assert webhooks.repair() == [delivery.id]
    monkeypatch.setattr(webhooks.timezone, "now", behind)
    assert webhooks.deliver(delivery.id) == WebhookDelivery.Status.SENT
    assert len(hook.requests) == 2

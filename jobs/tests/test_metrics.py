"""/metrics: Prometheus text computed from the database, parsed back with prometheus-client."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from prometheus_client.parser import text_string_to_metric_families

from jobs import metrics, outcomes, sweeper, views
from jobs.models import Image, ProcessingTime, ScheduleActivity, Sweep, SweepLock, WebhookDelivery
from jobs.sweeper import SWEEP_TASK
from jobs.tasks import make_thumbnails

from .conftest import image_bytes, image_row

pytestmark = pytest.mark.django_db


def scrape(client: Client, **headers: str) -> dict[str, list]:
    response = client.get(reverse("jobs:metrics"), **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(response.content.decode())
    }


def value(samples: list, name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matching) == 1, (name, labels, samples)
    return matching[0]


def make_image(index: int, status: str, sweep: Sweep | None, **fields) -> Image:
    # The schedule is copied from the sweep, as a sweep's claim does.
    schedule_name = sweep.schedule_name if sweep else ""
    return image_row(index, status, sweep=sweep, schedule_name=schedule_name, **fields)


@pytest.fixture
def history() -> dict[str, object]:
    """Images of every status from two schedules and an upload, with known durations."""
    now = timezone.now()
    for name in ("inbox", "other"):
        sweep_schedule(name)
    inbox = Sweep.objects.create(trigger="schedule", schedule_name="inbox", folder="/in")
    inbox.finish(Sweep.Status.DONE)
    failed_sweep = Sweep.objects.create(trigger="schedule", schedule_name="inbox", folder="/in")
    failed_sweep.finish(Sweep.Status.FAILED, "bad folder")
    other = Sweep.objects.create(trigger="schedule", schedule_name="other", folder="/o")
    other.finish(Sweep.Status.DONE)
    Sweep.objects.filter(id=other.id).update(finished_at=now - timedelta(hours=1))
    upload = Sweep.objects.create(trigger="upload", folder="/media/uploads")
    durations = {  # seconds, by status, for the images that finished
        Image.Status.DONE: [0.04, 0.3, 0.3, 1.5, 7.0, 400.0],
        Image.Status.FAILED: [0.2, 150.0],
        Image.Status.DUPLICATE: [0.08],
    }
    index = 0
    for status, seconds in durations.items():
        for duration in seconds:
            index += 1
            image = make_image(
                index,
                status,
                inbox if index % 2 else upload,
                started_at=now - timedelta(seconds=duration),
                finished_at=now,
                archive=f"archives/{index}.zip" if status == Image.Status.DONE else "",
                archive_size=1000 * index if status == Image.Status.DONE else None,
            )
            with transaction.atomic():  # as processing does, with its final-state update
                outcomes.image_finished(image)
    oldest = now - timedelta(minutes=10)
    make_image(100, Image.Status.PENDING, other, queued_at=oldest)
    make_image(101, Image.Status.PENDING, other, queued_at=now - timedelta(minutes=1))
    make_image(102, Image.Status.PROCESSING, other, queued_at=now - timedelta(hours=2))
    with transaction.atomic():
        outcomes.image_finished(make_image(103, Image.Status.FAILED, None))  # never started
    WebhookDelivery.objects.create(event="image.done", url="http://a/", body="{}", status="sent")
    return {"durations": durations, "oldest": oldest, "inbox": inbox, "other": other}


def test_metrics_match_the_database(client, history, broker, folders):
    queued = 3
    with make_thumbnails.app.connection_for_write(broker.url) as connection:
        for image_id in range(queued):
            make_thumbnails.apply_async((10_000 + image_id,), connection=connection)

    families = scrape(client)

    images = families["parroter_images"]
    for status in Image.Status.values:
        for schedule in ("inbox", "other", ""):
            expected = sum(
                1
                for image in Image.objects.select_related("sweep")
                if image.status == status
                and ((image.sweep and image.sweep.schedule_name) or "") == schedule
            )
            found = [
                s.value for s in images if s.labels == {"status": status, "schedule": schedule}
            ]
            assert found == ([expected] if expected or schedule == "" else []), (status, schedule)
    assert sum(s.value for s in images) == Image.objects.count()

    histogram = families["parroter_image_processing_seconds"]
    for status, seconds in history["durations"].items():
        for bound in ProcessingTime.BOUNDS:
            expected = sum(1 for duration in seconds if duration <= bound)
            name = "parroter_image_processing_seconds_bucket"
            assert value(histogram, name, status=status, le=str(float(bound))) == expected
        name = "parroter_image_processing_seconds"
        assert value(histogram, name + "_bucket", status=status, le="+Inf") == len(seconds)
        assert value(histogram, name + "_count", status=status) == len(seconds)
        assert value(histogram, name + "_sum", status=status) == pytest.approx(sum(seconds))

    assert value(families["parroter_queue_messages"], "parroter_queue_messages") == queued
    waited = value(families["parroter_oldest_pending_seconds"], "parroter_oldest_pending_seconds")
    age = (timezone.now() - history["oldest"]).total_seconds()
    assert age - 60 < waited <= age, "the pending image of 10 min, not the processing one of 2 h"

    sweeps = families["parroter_last_good_sweep_timestamp_seconds"]
    name = "parroter_last_good_sweep_timestamp_seconds"
    assert {s.labels["schedule"] for s in sweeps} == {"inbox", "other"}
    for schedule in ("inbox", "other"):
        last = Sweep.objects.filter(schedule_name=schedule, status="done").latest("finished_at")
        assert value(sweeps, name, schedule=schedule) == pytest.approx(last.finished_at.timestamp())

    archived = sum(Image.objects.exclude(archive="").values_list("archive_size", flat=True))
    assert archived > 0
    assert value(families["parroter_archive_bytes"], "parroter_archive_bytes") == archived
    deliveries = families["parroter_webhook_deliveries"]
    assert value(deliveries, "parroter_webhook_deliveries", status="sent") == 1
    assert value(deliveries, "parroter_webhook_deliveries", status="pending") == 0


def test_images_by_status_and_schedule_are_counted_from_an_index_alone():
    from .test_admin import query_plan

    with CaptureQueriesContext(connection) as queries:
        metrics.image_figures()
    [query] = queries.captured_queries
    plan = query_plan(query["sql"])
    # Not a pass over every image joined to its sweep: on every scrape, that took 0.6-0.9 s
    # on SQLite with 200,000 images.
    assert "jobs_sweep" not in plan
    if connection.vendor == "postgresql":
        assert "Index Only Scan" in plan, plan
    else:
        assert "COVERING INDEX" in plan, plan


def test_a_sweep_gives_its_images_its_schedule_and_keeps_it_past_the_sweep_record(
    client, folders, drop
):
    drop(folders["watch"], "a.jpg")
    outcome = sweeper.sweep_folder(str(folders["watch"]), ["64x64"], schedule_name="inbox")
    drop(folders["watch"], "b.jpg")
    sweeper.sweep_folder(str(folders["watch"]), ["64x64"])
    assert dict(Image.objects.values_list("name", "schedule_name")) == {
        "a.jpg": "inbox",
        "b.jpg": "",
    }
    # An admin may delete a sweep record; its images were still swept by that schedule.
    Sweep.objects.filter(id=outcome.sweep.id).delete()
    images = scrape(client)["parroter_images"]
    assert value(images, "parroter_images", status="pending", schedule="inbox") == 1
    assert value(images, "parroter_images", status="pending", schedule="") == 1


def test_migration_copies_each_images_schedule_and_forgets_sizes_of_gone_archives():
    import importlib

    from django.apps import apps

    migration = importlib.import_module("jobs.migrations.0016_copy_schedule_names")
    scheduled = Sweep.objects.create(trigger="schedule", schedule_name="inbox", folder="/in")
    manual = Sweep.objects.create(trigger="manual", folder="/in")
    image_row(1, Image.Status.DONE, sweep=scheduled, archive="a/1.zip", archive_size=10)
    image_row(2, Image.Status.DONE, sweep=manual, archive="a/2.zip", archive_size=20)
    image_row(3, Image.Status.DONE, sweep=None)
    # A size left behind by a deleted archive (a row written before sizes were cleared).
    image_row(4, Image.Status.DONE, sweep=scheduled, archive="", archive_size=40)
    migration.copy_schedule_names(apps, None)
    rows = Image.objects.order_by("name").values_list("schedule_name", "archive_size")
    assert list(rows) == [("inbox", 10), ("", 20), ("", None), ("inbox", None)]


def test_metrics_histogram_keeps_counting_after_images_are_deleted(client, history, broker):
    before = scrape(client)
    Image.objects.filter(status=Image.Status.DONE).delete()
    after = scrape(client)
    name = "parroter_image_processing_seconds_count"
    done = len(history["durations"][Image.Status.DONE])
    for families in (before, after):
        histogram = families["parroter_image_processing_seconds"]
        assert value(histogram, name, status="done") == done, "a histogram never shrinks"
    images = after["parroter_images"]
    assert not [s for s in images if s.labels["status"] == "done" and s.value]
    assert value(after["parroter_archive_bytes"], "parroter_archive_bytes") == 0


def test_metrics_count_each_processed_image_once(client, broker, folders, drop):
    drop(folders["watch"], "a.jpg", image_bytes((300, 200), colour=(1, 2, 3)))
    drop(folders["watch"], "b.jpg", image_bytes((300, 200), colour=(1, 2, 3)))
    drop(folders["watch"], "c.jpg", b"not an image")
    record, path, labels = sweeper.start_sweep(
        str(folders["watch"]), ["64x64"], trigger=Sweep.Trigger.MANUAL
    )
    sweeper.run_sweep(record, path, labels)
    for image in Image.objects.order_by("name"):
        make_thumbnails(image.id)
        make_thumbnails(image.id)  # a redelivered message: skipped, not counted again
    histogram = scrape(client)["parroter_image_processing_seconds"]
    name = "parroter_image_processing_seconds_count"
    for status in ("done", "duplicate", "failed"):
        assert value(histogram, name, status=status) == 1
    spent = sum(image.duration.total_seconds() for image in Image.objects.all())
    total = sum(value(histogram, name[:-5] + "sum", status=s) for s in Image.FINAL_STATUSES)
    assert total == pytest.approx(spent)


def test_metrics_on_an_empty_database_say_zero(client, broker):
    families = scrape(client)
    assert {s.value for s in families["parroter_images"]} == {0}
    assert value(families["parroter_queue_messages"], "parroter_queue_messages") == 0
    assert families["parroter_last_good_sweep_timestamp_seconds"] == []
    name = "parroter_image_processing_seconds_count"
    assert value(families["parroter_image_processing_seconds"], name, status="done") == 0


def sweep_schedule(name: str) -> PeriodicTask:
    every = IntervalSchedule.objects.get_or_create(every=10, period=IntervalSchedule.SECONDS)[0]
    return PeriodicTask.objects.create(name=name, task=SWEEP_TASK, interval=every)


def test_metrics_last_good_sweep_counts_idle_sweeps_that_leave_no_row(client, broker):
    sweep_schedule("quiet")
    ScheduleActivity.note_idle("quiet")
    idle_at = ScheduleActivity.objects.get(schedule_name="quiet").last_idle_at
    name = "parroter_last_good_sweep_timestamp_seconds"
    sweeps = scrape(client)[name]
    assert value(sweeps, name, schedule="quiet") == pytest.approx(idle_at.timestamp())


def test_metrics_require_the_token_when_one_is_set(client, settings, broker):
    settings.METRICS_TOKEN = "s3cret-token"  # noqa: S105
    url = reverse("jobs:metrics")
    refused = client.get(url)
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert client.get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get(url, HTTP_AUTHORIZATION="Basic s3cret-token").status_code == 401
    assert client.get(url, HTTP_AUTHORIZATION="Bearer s3cret-tökén").status_code == 401
    families = scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert "parroter_images" in families
    # With a token, the address does not matter: a scraper elsewhere is let in.
    request = RequestFactory().get(
        url, REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer s3cret-token"
    )
    assert views.metrics_page(request).status_code == 200


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("203.0.113.7", False),
        ("10.0.0.5", False),
        ("::ffff:192.0.2.1", False),
        ("", False),
    ],
)
def test_metrics_without_a_token_answer_loopback_only(settings, broker, address, allowed):
    settings.METRICS_TOKEN = ""
    request = RequestFactory().get(reverse("jobs:metrics"), REMOTE_ADDR=address)
    response = views.metrics_page(request)
    assert response.status_code == (200 if allowed else 403)
    if allowed:
        assert b"parroter_images" in response.content
    else:
        assert b"loopback" in response.content


def test_a_deleted_schedule_leaves_no_last_good_sweep_behind(client, broker, history):
    ScheduleActivity.note_idle("inbox")
    ScheduleActivity.note_idle("other")
    PeriodicTask.objects.get(name="other").delete()
    name = "parroter_last_good_sweep_timestamp_seconds"
    sweeps = scrape(client)[name]
    assert {s.labels["schedule"] for s in sweeps} == {"inbox"}, "no series that never moves"
    assert list(ScheduleActivity.objects.values_list("schedule_name", flat=True)) == ["inbox"]
    # Its sweeps and images stay on record, and counted.
    assert Sweep.objects.filter(schedule_name="other").exists()
    images = scrape(client)["parroter_images"]
    assert value(images, "parroter_images", status="pending", schedule="other") == 2


def test_last_good_sweep_does_not_advance_while_every_sweep_is_skipped(client, broker, folders):
    """A sweep of the folder that hangs (dead NFS: its lease thread still renews the lock)
    makes every scheduled sweep after it "skipped": those are no good sweep, so the
    schedule's last-good timestamp stays, and an alert on it fires."""
    sweep_schedule("inbox")
    # The last sweep that really ran, an hour ago.
    ScheduleActivity.note_idle("inbox")
    an_hour_ago = timezone.now() - timedelta(hours=1)
    ScheduleActivity.objects.update(last_idle_at=an_hour_ago)
    # A hung sweep holds the folder (its lease is renewed by its thread).
    assert SweepLock.acquire(str(folders["watch"])) is not None
    outcome = sweeper.sweep_folder(str(folders["watch"]), ["64x64"], schedule_name="inbox")
    assert outcome.sweep.status == Sweep.Status.SKIPPED
    name = "parroter_last_good_sweep_timestamp_seconds"
    last_good = value(scrape(client)[name], name, schedule="inbox")
    assert last_good == pytest.approx(an_hour_ago.timestamp()), (
        f"last good sweep moved {last_good - an_hour_ago.timestamp():.0f} s forward "
        "although no sweep ran"
    )

"""The admin: image and sweep pages, actions, the periodic-task form, the dashboard."""

from __future__ import annotations

import json
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.db.models import QuerySet
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from jobs import beat, models, runner, stats, uploads
from jobs.archives import archive_holder
from jobs.broker import queue_length
from jobs.models import Image, Sweep
from jobs.sweeper import SWEEP_TASK, recover_unswept
from project.celery import app as celery_app

from .conftest import image_bytes, image_row

pytestmark = pytest.mark.django_db


@pytest.fixture
def processed(folders, drop, sweep_and_process) -> dict[str, Image]:
    drop(folders["watch"], "photo.jpg", image_bytes((400, 300)))
    drop(folders["watch"], "broken.jpg", b"not an image")
    images = sweep_and_process(folders["watch"], ["64x64", "32x32"])
    return {image.name: image for image in images}


@pytest.fixture
def every_second() -> IntervalSchedule:
    return IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)


def test_image_changelist_shows_previews_badges_sizes_and_facets(admin_client, processed):
    page = admin_client.get(reverse("admin:jobs_image_changelist")).content.decode()
    photo = processed["photo.jpg"]
    assert f'src="/images/{photo.id}/thumbnails/64x64/?v=' in page
    assert "parroter-badge" in page
    assert "32×24, 64×48" in page
    assert "400×300" in page
    assert re.search(r"done\s*\(1\)", page)  # filter facets count
    assert re.search(r"failed\s*\(1\)", page)


def test_image_changelist_searches_by_hash(admin_client, processed):
    photo = processed["photo.jpg"]
    url = reverse("admin:jobs_image_changelist") + f"?q={photo.sha256}"
    page = admin_client.get(url).content.decode()
    assert "photo.jpg" in page
    assert "broken.jpg" not in page


def test_image_change_page_shows_thumbnails_zip_download_and_links(admin_client, processed):
    photo = processed["photo.jpg"]
    page = admin_client.get(reverse("admin:jobs_image_change", args=[photo.id])).content.decode()
    assert page.count('class="parroter-gallery"') == 1
    assert f"/images/{photo.id}/thumbnails/64x64/" in page
    assert "<code>photo_64x48.jpg</code>" in page
    assert reverse("jobs:archive", args=[photo.id]) in page
    assert reverse("admin:jobs_sweep_change", args=[photo.sweep_id]) in page
    assert "Reprocess…" in page


def test_image_change_page_shows_a_failure_in_full(admin_client, processed):
    broken = processed["broken.jpg"]
    page = admin_client.get(reverse("admin:jobs_image_change", args=[broken.id])).content.decode()
    assert '<pre class="parroter-error">' in page
    assert "not an image" in page
    assert reverse("jobs:archive", args=[broken.id]) not in page  # it has no zip


def test_thumbnails_are_served_to_staff_only(client, admin_client, processed, django_user_model):
    url = reverse("jobs:thumbnail", args=[processed["photo.jpg"].id, "64x64"])
    assert admin_client.get(url).status_code == 200
    assert client.get(url).status_code == 302
    client.force_login(django_user_model.objects.create_user("eve"))
    assert client.get(url).status_code == 404


def test_reprocess_makes_new_sizes_from_the_kept_original(
    admin_client, processed, folders, django_capture_on_commit_callbacks
):
    photo = processed["photo.jpg"]
    old_archive = photo.archive
    old_file = folders["media"] / old_archive
    url = reverse("admin:jobs_image_reprocess")
    page = admin_client.get(url + f"?ids={photo.id}").content.decode()
    assert 'value="64x64, 32x32"' in page

    response = admin_client.post(url, {"ids": str(photo.id), "sizes": "100x100"})
    assert response.status_code == 302
    photo.refresh_from_db()
    assert photo.status == Image.Status.PENDING
    # While the reprocess waits, the old zip is kept and stays recorded.
    assert photo.archive == old_archive
    assert old_file.is_file()

    with django_capture_on_commit_callbacks(execute=True):
        assert runner.process_image(photo.id) == Image.Status.DONE
    photo.refresh_from_db()
    assert photo.thumbnails == {"100x100": [100, 75]}
    assert photo.sizes == ["100x100"]
    # Once done, the record points to a new zip with the new sizes; the old file is gone.
    assert photo.archive != old_archive
    with zipfile.ZipFile(folders["media"] / photo.archive) as archive:
        assert sorted(archive.namelist()) == ["photo.jpg", "photo_100x75.jpg"]
    assert not old_file.exists()
    assert Path(photo.original_path).is_file()
    assert Path(photo.original_path).parent.parent.parent.parent.name == "originals"


def test_reprocess_is_refused_to_staff_who_may_not_view_images(
    client, processed, django_user_model
):
    photo = processed["photo.jpg"]
    client.force_login(staff(django_user_model, "reprocess_image"))
    url = reverse("admin:jobs_image_reprocess")
    # The page names the images it would make again: not for those the list is refused to.
    assert client.get(reverse("admin:jobs_image_changelist")).status_code == 403
    assert client.get(url + f"?ids={photo.id}").status_code == 403
    assert client.post(url, {"ids": str(photo.id), "sizes": "100x100"}).status_code == 403
    photo.refresh_from_db()
    assert photo.status == Image.Status.DONE


def test_reprocess_starts_a_new_wait_so_recovery_does_not_requeue_it_at_once(
    admin_client, processed
):
    photo = processed["photo.jpg"]
    Image.objects.filter(id=photo.id).update(queued_at="2000-01-01T00:00:00Z")
    before = timezone.now()
    admin_client.post(
        reverse("admin:jobs_image_reprocess"), {"ids": str(photo.id), "sizes": "100x100"}
    )
    photo.refresh_from_db()
    assert photo.status == Image.Status.PENDING
    assert photo.queued_at >= before
    assert recover_unswept().requeue == []  # its message has REQUEUE_AFTER to arrive


def downloads(client, image: Image) -> bool:
    """True when the image's zip can be downloaded (read to the end, so the file is closed)."""
    response = client.get(reverse("jobs:archive", args=[image.id]))
    return response.status_code == 200 and bool(b"".join(response.streaming_content))


@pytest.fixture
def twins(folders, drop, sweep_and_process) -> tuple[Image, Image]:
    """The same picture dropped twice: the first done with a zip, the second its duplicate."""
    picture = image_bytes((300, 200))
    drop(folders["watch"], "one.jpg", picture)
    drop(folders["watch"], "two.jpg", picture)
    images = sweep_and_process(folders["watch"], ["64x64"])
    first = next(image for image in images if image.status == Image.Status.DONE)
    second = next(image for image in images if image.status == Image.Status.DUPLICATE)
    assert second.duplicate_of_id == first.id
    return first, second


def test_reprocess_refuses_an_image_whose_zip_duplicates_use(admin_client, twins, folders):
    first, second = twins
    url = reverse("admin:jobs_image_reprocess")
    form = admin_client.get(url + f"?ids={first.id}").content.decode()
    assert "its zip is also the zip of 1 duplicate image(s)" in form

    response = admin_client.post(url, {"ids": str(first.id), "sizes": "100x100"}, follow=True)
    assert "left alone: its zip is also the zip of 1 duplicate image(s)" in (
        response.content.decode()
    )
    first.refresh_from_db()
    assert (first.status, first.sizes) == (Image.Status.DONE, ["64x64"])
    assert (folders["media"] / first.archive).is_file()
    assert downloads(admin_client, second)


def test_delete_keeps_an_image_whose_zip_duplicates_outside_the_deletion_use(
    admin_client, twins, folders, django_capture_on_commit_callbacks
):
    first, second = twins
    archive = folders["media"] / first.archive
    changelist = reverse("admin:jobs_image_changelist")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            changelist,
            {"action": "delete_selected", "_selected_action": [first.id], "post": "yes"},
            follow=True,
        )
    assert "was kept: its zip is also the zip of 1 duplicate image(s)" in (
        response.content.decode()
    )
    assert Image.objects.filter(id=first.id).exists()
    assert archive.is_file()
    assert downloads(admin_client, second)

    # Deleted together with all of its duplicates, it goes.
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            changelist,
            {
                "action": "delete_selected",
                "_selected_action": [first.id, second.id],
                "post": "yes",
            },
        )
    assert not Image.objects.filter(id__in=[first.id, second.id]).exists()
    assert not archive.exists()


def done_and_its_copy_pending(folders, drop, sweep_and_process) -> tuple[Image, Image]:
    """An image done with its zip, and the same content claimed in another folder, not yet
    processed: PostgreSQL only, where another connection can record it meanwhile."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite takes its one write lock up front: nothing runs in between")
    drop(folders["watch"], "photo.jpg", image_bytes((400, 300)))
    (first,) = sweep_and_process(folders["watch"])
    drop(folders["other"], "copy.jpg", image_bytes((400, 300)))
    (copy,) = sweep_and_process(folders["other"], process=False)
    return first, copy


@pytest.mark.django_db(transaction=True)
def test_delete_never_takes_the_zip_of_a_duplicate_recorded_while_it_deletes(
    admin_client, folders, drop, sweep_and_process, monkeypatch
):
    first, copy = done_and_its_copy_pending(folders, drop, sweep_and_process)
    worker = threading.Thread(target=process_and_close, args=(copy.id,))
    real_duplicates_using = uploads.duplicates_using

    def copy_finishing_meanwhile(images):
        used = real_duplicates_using(images)
        if transaction.get_connection().in_atomic_block and not worker.is_alive():
            # A worker finishes the same content while the deletion decides what may go.
            worker.start()
            worker.join(timeout=3)
        return used

    monkeypatch.setattr(uploads, "duplicates_using", copy_finishing_meanwhile)
    admin_client.post(
        reverse("admin:jobs_image_changelist"),
        {"action": "delete_selected", "_selected_action": [first.id], "post": "yes"},
    )
    worker.join(timeout=30)
    assert not worker.is_alive()
    copy.refresh_from_db()
    holder = archive_holder(copy)
    assert holder is not None, f"{copy.status}, duplicate of #{copy.duplicate_of_id}: no zip"
    assert (folders["media"] / holder.archive).is_file()


@pytest.mark.django_db(transaction=True)
def test_reprocess_never_takes_the_zip_of_a_duplicate_recorded_while_it_claims(
    folders, drop, sweep_and_process, monkeypatch
):
    first, copy = done_and_its_copy_pending(folders, drop, sweep_and_process)
    recording = threading.Event()
    real_finished = models._finished

    def slow_to_commit(image):
        real_finished(image)
        if image.id == copy.id:
            # The duplicate is recorded, the first's row locked, not yet committed.
            recording.set()
            time.sleep(2)

    monkeypatch.setattr(models, "_finished", slow_to_commit)
    worker = threading.Thread(target=process_and_close, args=(copy.id,))
    worker.start()
    assert recording.wait(timeout=30)
    result = uploads.claim_again([Image.objects.get(id=first.id)], ["100x100"])
    worker.join(timeout=30)
    copy.refresh_from_db()
    assert (copy.status, copy.duplicate_of_id) == (Image.Status.DUPLICATE, first.id)
    assert result.queued == [], "its zip is the duplicate's too"
    assert (folders["media"] / archive_holder(copy).archive).is_file()


def process_and_close(image_id: int) -> None:
    try:
        runner.process_image(image_id)
    finally:
        connection.close()


def test_retry_failed_reprocesses_only_failed_images(admin_client, processed, settings):
    broken, photo = processed["broken.jpg"], processed["photo.jpg"]
    # A fixed file: the kept original is replaced by a good image before the retry.
    Path(broken.original_path).write_bytes(image_bytes((50, 40)))
    response = admin_client.post(
        reverse("admin:jobs_image_changelist"),
        {"action": "retry_failed", "_selected_action": [broken.id, photo.id]},
    )
    assert response.status_code == 302
    assert Image.objects.get(id=photo.id).status == Image.Status.DONE
    broken.refresh_from_db()
    assert broken.status == Image.Status.PENDING
    assert not Path(broken.original_path + ".error.txt").exists()

    assert runner.process_image(broken.id) == Image.Status.DONE
    broken.refresh_from_db()
    assert "/originals/" in broken.original_path
    assert Path(broken.original_path).is_file()


def test_reprocess_leaves_images_in_progress_alone_with_a_reason(
    admin_client, folders, drop, sweep_and_process
):
    drop(folders["watch"], "waiting.jpg")
    sweep_and_process(process=False)
    image = Image.objects.get()
    response = admin_client.post(
        reverse("admin:jobs_image_reprocess"), {"ids": str(image.id), "sizes": "10x10"}, follow=True
    )
    assert "still being processed" in response.content.decode()
    assert Image.objects.get().status == Image.Status.PENDING
    assert Image.objects.get().sizes != ["10x10"]


def test_delete_selected_asks_first_then_removes_records_and_archives(
    admin_client, processed, folders
):
    photo = processed["photo.jpg"]
    archive = folders["media"] / photo.archive
    changelist = reverse("admin:jobs_image_changelist")
    confirm = admin_client.post(
        changelist, {"action": "delete_selected", "_selected_action": [photo.id]}
    )
    assert confirm.status_code == 200
    assert "Their zip archives are deleted" in confirm.content.decode()
    assert archive.is_file()

    with_commit = admin_client.post(
        changelist,
        {"action": "delete_selected", "_selected_action": [photo.id], "post": "yes"},
    )
    assert with_commit.status_code == 302
    assert not Image.objects.filter(id=photo.id).exists()


def test_delete_removes_the_archive_once_committed(
    admin_client, processed, folders, django_capture_on_commit_callbacks
):
    photo = processed["photo.jpg"]
    archive = folders["media"] / photo.archive
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            reverse("admin:jobs_image_changelist"),
            {"action": "delete_selected", "_selected_action": [photo.id], "post": "yes"},
        )
    assert not archive.exists()
    assert Path(photo.original_path).is_file()  # originals are kept


def test_sweep_changelist_links_images_and_offers_sweep_now(admin_client, processed):
    page = admin_client.get(reverse("admin:jobs_sweep_changelist")).content.decode()
    sweep = processed["photo.jpg"].sweep
    assert f"?sweep__id__exact={sweep.id}" in page
    assert reverse("admin:jobs_sweep_now") in page


def test_sweep_now_rejects_a_folder_outside_the_roots(admin_client, folders):
    response = admin_client.post(
        reverse("admin:jobs_sweep_now"), {"folder": "/etc", "sizes": "64x64"}
    )
    assert response.status_code == 200
    assert "outside the allowed WATCH_ROOTS" in response.content.decode()


def test_sweep_now_prefills_defaults_and_sends_a_sweep(admin_client, folders, broker):
    form = admin_client.get(reverse("admin:jobs_sweep_now")).content.decode()
    assert str(folders["watch"]) in form
    assert "128x128, 256x256, 512x512" in form

    response = admin_client.post(
        reverse("admin:jobs_sweep_now"), {"folder": str(folders["other"]), "sizes": "64x64"}
    )
    assert response.status_code == 302
    task_id = response.url.rstrip("/").rsplit("/", 1)[1]
    assert queue_length(settings.SWEEP_QUEUE) == 1
    status = admin_client.get(reverse("jobs:sweep-by-task", args=[task_id])).json()
    assert status == {"id": None, "status": "queued", "over": False, "images": []}
    assert "Waiting for a worker" in admin_client.get(response.url).content.decode()


def test_sweep_now_with_the_broker_down_says_so_on_the_form(admin_client, folders, broker):
    broker.stop()
    response = admin_client.post(
        reverse("admin:jobs_sweep_now"), {"folder": str(folders["other"]), "sizes": "64x64"}
    )
    assert response.status_code == 200
    assert "The broker does not answer" in response.content.decode()


def test_reprocess_with_the_broker_down_stands_for_recovery(
    admin_client, processed, broker, django_capture_on_commit_callbacks
):
    broker.stop()
    photo = processed["photo.jpg"]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:jobs_image_reprocess"), {"ids": str(photo.id), "sizes": "100x100"}
        )
    assert response.status_code == 302
    photo.refresh_from_db()
    assert (photo.status, photo.sizes) == (Image.Status.PENDING, ["100x100"])


def test_periodic_task_form_writes_sweep_kwargs(admin_client, folders, every_second):
    response = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"),
        {
            "name": "second folder",
            "regtask": "jobs.sweep_folder",
            "task": "",
            "enabled": "on",
            "folder": str(folders["other"]),
            "sizes": "40x30 20x20",
            "interval": every_second.id,
            "args": "[]",
            "kwargs": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    task = PeriodicTask.objects.get(name="second folder")
    assert task.task == "jobs.sweep_folder"
    assert json.loads(task.kwargs) == {"folder": str(folders["other"]), "sizes": ["40x30", "20x20"]}


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("", "Give the absolute path"),
        ("relative/path", "must be an absolute path"),
        ("/etc", "outside the allowed WATCH_ROOTS"),
        ("{media}", "overlaps MEDIA_ROOT"),
        ("{root}/missing", "does not exist"),
    ],
)
def test_periodic_task_form_rejects_bad_folders(
    admin_client, folders, every_second, folder, message
):
    folder = folder.format(media=folders["media"], root=folders["root"])
    response = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"),
        {
            "name": "bad",
            "regtask": "jobs.sweep_folder",
            "folder": folder,
            "sizes": "64x64",
            "interval": every_second.id,
            "args": "[]",
        },
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PeriodicTask.objects.filter(name="bad").exists()


def test_periodic_task_form_rejects_bad_sizes_and_a_folder_already_swept(
    admin_client, folders, every_second
):
    PeriodicTask.objects.create(
        name="existing",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(folders["other"])}),
    )
    response = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"),
        {
            "name": "bad",
            "regtask": "jobs.sweep_folder",
            "folder": str(folders["other"]),
            "sizes": "64by64",
            "interval": every_second.id,
            "args": "[]",
        },
    )
    page = response.content.decode()
    assert "not a size like 128x128" in page
    assert "already swept by the periodic task" in page


def test_periodic_task_change_form_shows_folder_and_sizes_from_kwargs(
    admin_client, folders, every_second
):
    task = PeriodicTask.objects.create(
        name="mine",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(folders["other"]), "sizes": ["40x30"]}),
    )
    page = admin_client.get(
        reverse("admin:django_celery_beat_periodictask_change", args=[task.id])
    ).content.decode()
    assert f'value="{folders["other"]}"' in page
    assert 'value="40x30"' in page


def test_periodic_task_form_round_trips_quality(admin_client, folders, every_second):
    form = {
        "name": "small thumbnails",
        "regtask": "jobs.sweep_folder",
        "task": "",
        "enabled": "on",
        "folder": str(folders["other"]),
        "sizes": "40x30",
        "quality": "40",
        "interval": every_second.id,
        "args": "[]",
        "kwargs": "",
    }
    add = admin_client.post(reverse("admin:django_celery_beat_periodictask_add"), form)
    assert add.status_code == 302, add.content.decode()[:3000]
    task = PeriodicTask.objects.get(name="small thumbnails")
    assert json.loads(task.kwargs) == {
        "folder": str(folders["other"]),
        "sizes": ["40x30"],
        "quality": 40,
    }
    change_url = reverse("admin:django_celery_beat_periodictask_change", args=[task.id])
    page = admin_client.get(change_url).content.decode()
    assert re.search(r'<input[^>]*name="quality"[^>]*value="40"', page)
    assert "Thumbnail quality" in page

    cleared = admin_client.post(change_url, {**form, "quality": ""})
    assert cleared.status_code == 302, cleared.content.decode()[:3000]
    task.refresh_from_db()
    assert json.loads(task.kwargs) == {"folder": str(folders["other"]), "sizes": ["40x30"]}


@pytest.mark.parametrize("quality", ["0", "200", "x"])
def test_periodic_task_form_rejects_a_bad_quality(admin_client, folders, every_second, quality):
    response = admin_client.post(
        reverse("admin:django_celery_beat_periodictask_add"),
        {
            "name": "bad",
            "regtask": "jobs.sweep_folder",
            "folder": str(folders["other"]),
            "sizes": "64x64",
            "quality": quality,
            "interval": every_second.id,
            "args": "[]",
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["quality"]
    assert not PeriodicTask.objects.filter(name="bad").exists()


def test_image_change_page_shows_the_output_options(
    admin_client, folders, drop, settings, sweep_and_process
):
    settings.JPEG_QUALITY = 85
    drop(folders["watch"], "default.jpg", image_bytes((100, 100)))
    default = sweep_and_process(folders["watch"], ["32x32"])[0]
    drop(folders["other"], "small.jpg", image_bytes((100, 100)))
    small = sweep_and_process(folders["other"], ["32x32"], quality=30)[0]
    small_id, sweep = small.id, small.sweep

    page = admin_client.get(reverse("admin:jobs_image_change", args=[small_id])).content.decode()
    assert "Output options" in page
    assert "quality 30" in page
    page = admin_client.get(reverse("admin:jobs_image_change", args=[default.id])).content.decode()
    assert "defaults (JPEG_QUALITY, now 85, for JPEG)" in page
    page = admin_client.get(reverse("admin:jobs_sweep_change", args=[sweep.id])).content.decode()
    assert "quality 30" in page


def test_periodic_task_list_shows_owner_next_run_and_last_sweep(
    admin_client, folders, every_second
):
    PeriodicTask.objects.create(
        name="sweep-watch-folder",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(folders["watch"])}),
    )
    PeriodicTask.objects.create(
        name="mine",
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(folders["other"]), "sizes": ["40x30"]}),
        last_run_at=timezone.now(),
    )
    Sweep.objects.create(
        trigger=Sweep.Trigger.SCHEDULE, schedule_name="mine", folder="x", status="done", claimed=3
    )
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_changelist"))
    text = page.content.decode()
    assert ">settings</span>" in text
    assert ">admin</span>" in text
    assert "next run (utc)" in text.lower()
    assert "3 claimed" in text
    assert "40×30" in text


def test_settings_owned_periodic_task_is_read_only(admin_client, folders, every_second):
    task = PeriodicTask.objects.create(
        name="sweep-watch-folder", task="jobs.sweep_folder", interval=every_second
    )
    url = reverse("admin:django_celery_beat_periodictask_change", args=[task.id])
    page = admin_client.get(url).content.decode()
    assert 'name="_save"' not in page
    assert ">settings</span>" in page
    assert admin_client.post(url, {"name": "renamed"}).status_code == 403
    delete = reverse("admin:django_celery_beat_periodictask_delete", args=[task.id])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403


def test_retire_removed_entries_disables_rows_that_left_the_settings(every_second):
    PeriodicTask.objects.create(name="kept", task="jobs.sweep_folder", interval=every_second)
    PeriodicTask.objects.create(name="gone", task="jobs.sweep_folder", interval=every_second)
    PeriodicTask.objects.create(name="admin-made", task="jobs.sweep_folder", interval=every_second)
    assert beat.retire_removed_entries({"kept", "gone"}) == []

    assert beat.retire_removed_entries({"kept"}) == ["gone"]

    gone = PeriodicTask.objects.get(name="gone")
    assert not gone.enabled
    assert "until its entry was removed" in gone.description
    assert PeriodicTask.objects.get(name="kept").enabled
    assert PeriodicTask.objects.get(name="admin-made").enabled
    assert PeriodicTask.objects.get(name="admin-made").description == ""
    # Once retired it is an ordinary task: enabling it again sticks.
    PeriodicTask.objects.filter(name="gone").update(enabled=True)
    assert beat.retire_removed_entries({"kept"}) == []


def test_next_run_of_an_interval_task_follows_its_last_run(every_second):
    now = timezone.now()
    task = PeriodicTask.objects.create(
        name="t", task="jobs.sweep_folder", interval=every_second, last_run_at=now
    )
    when = beat.next_run(task, now)
    assert now <= when <= now + timezone.timedelta(seconds=1.5)
    task.enabled = False
    assert beat.next_run(task, now) is None


def test_next_run_of_a_crontab_task_that_never_ran_is_its_next_slot():
    four = CrontabSchedule.objects.create(minute="0", hour="4")
    task = PeriodicTask.objects.create(name="nightly", task="celery.backend_cleanup", crontab=four)
    when = timezone.localtime(beat.next_run(task))
    assert (when.hour, when.minute) == (4, 0)
    assert when > timezone.now()


def test_dashboard_shows_chart_figures_and_tolerates_redis_down(admin_client, processed):
    response = admin_client.get(reverse("dashboard"))
    assert response.status_code == 200
    page = response.content.decode()
    assert '<svg id="hourly-chart"' in page
    assert page.count('class="done"') == 48
    assert "1 failed" in page or "(1)" in page
    assert 'id="throughput"' in page
    assert "Archives on disk" in page


def test_dashboard_is_for_staff_only(client, folders, django_user_model):
    client.force_login(django_user_model.objects.create_user("eve"))
    response = client.get(reverse("dashboard"))
    assert response.status_code == 302
    assert "/admin/login/" in response.url


def test_hourly_chart_counts_done_and_failed_in_their_hour(processed):
    chart = stats.hourly_chart(1)
    assert len(chart.bars) == 24
    assert chart.total_done == 1
    assert chart.total_failed == 1
    assert chart.bars[-1].done_height > 0
    assert chart.bars[-1].failed_height > 0


def test_throughput_measures_images_and_megapixels_of_recent_sweeps(processed):
    rows = stats.recent_throughput()
    assert len(rows) == 1
    assert rows[0].images == 2
    assert rows[0].megapixels == pytest.approx(0.12)
    assert rows[0].per_minute > 0


def test_dashboard_shows_every_retention_setting(admin_client, folders, settings):
    settings.WEBHOOK_KEEP_DAYS = 12
    page = admin_client.get(reverse("dashboard")).content.decode()
    table = page[page.index('id="retention"') :]
    for name in (
        "KEEP_ORIGINALS_DAYS",
        "KEEP_ARCHIVES_DAYS",
        "RESULT_EXPIRES_DAYS",
        "IDLE_SWEEP_DAYS",
        "WEBHOOK_KEEP_DAYS",
    ):
        assert name in table
    assert "12 days" in table


# --- what staff may do with periodic tasks -------------------------------------------------


def staff(django_user_model, *codenames: str):
    user = django_user_model.objects.create_user("staff", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def sweep_schedule(name: str, folder: Path, interval: IntervalSchedule, enabled: bool = True):
    return PeriodicTask.objects.create(
        name=name,
        task="jobs.sweep_folder",
        interval=interval,
        enabled=enabled,
        kwargs=json.dumps({"folder": str(folder)}),
    )


SWITCHES = ("enable_tasks", "disable_tasks", "toggle_tasks", "run_tasks")


def test_staff_who_may_only_view_periodic_tasks_cannot_switch_or_run_them(
    client, folders, every_second, django_user_model, broker
):
    task = sweep_schedule("inbox", folders["other"], every_second)
    client.force_login(staff(django_user_model, "view_periodictask"))
    changelist = reverse("admin:django_celery_beat_periodictask_changelist")
    page = client.get(changelist).content.decode()
    assert page.count('name="action"') <= 1  # the list is shown...
    assert not [name for name in SWITCHES if f'value="{name}"' in page]  # ...with no switch
    for name in SWITCHES:
        client.post(changelist, {"action": name, "_selected_action": [task.id]})
    task.refresh_from_db()
    assert task.enabled
    assert queue_length(settings.SWEEP_QUEUE) == 0


def test_running_a_periodic_task_now_takes_the_sweep_now_permission(
    client, folders, every_second, django_user_model, broker
):
    task = sweep_schedule("inbox", folders["other"], every_second)
    changelist = reverse("admin:django_celery_beat_periodictask_changelist")
    client.force_login(staff(django_user_model, "view_periodictask", "change_periodictask"))
    page = client.get(changelist).content.decode()
    assert 'value="disable_tasks"' in page
    assert 'value="run_tasks"' not in page
    client.post(changelist, {"action": "run_tasks", "_selected_action": [task.id]})
    assert queue_length(settings.SWEEP_QUEUE) == 0

    user = django_user_model.objects.get(username="staff")
    user.user_permissions.add(Permission.objects.get(codename="sweep_now"))
    client.post(changelist, {"action": "run_tasks", "_selected_action": [task.id]})
    assert queue_length(settings.SWEEP_QUEUE) == 1
    # Sent as asked for by hand, not under the schedule's name: so it is always recorded,
    # even when it finds nothing.
    with celery_app.connection_for_read() as connection:
        queue = celery_app.amqp.queues[settings.SWEEP_QUEUE](connection.default_channel)
        message = queue.get(no_ack=True)
    assert message.headers["task"] == "jobs.sweep_folder"
    assert "periodic_task_name" not in message.headers
    assert message.decode()[1] == {"folder": str(folders["other"])}


def test_enabling_from_the_list_leaves_a_second_sweep_of_a_folder_off(
    admin_client, folders, every_second
):
    sweep_schedule("first", folders["other"], every_second)
    second = sweep_schedule("second", folders["other"], every_second, enabled=False)
    third = sweep_schedule("third", folders["other"] / "deeper", every_second, enabled=False)
    (folders["other"] / "deeper").mkdir()
    changelist = reverse("admin:django_celery_beat_periodictask_changelist")
    for action in ("enable_tasks", "toggle_tasks"):
        response = admin_client.post(
            changelist, {"action": action, "_selected_action": [second.id, third.id]}, follow=True
        )
        second.refresh_from_db()
        third.refresh_from_db()
        assert not second.enabled
        assert third.enabled  # a folder below another may have a schedule of its own
        assert "“second” was left disabled" in response.content.decode()
        assert "already swept by “first”" in response.content.decode()
        PeriodicTask.objects.filter(id=third.id).update(enabled=False)


def test_toggling_two_schedules_of_one_folder_swaps_them(admin_client, folders, every_second):
    first = sweep_schedule("first", folders["other"], every_second)
    second = sweep_schedule("second", folders["other"], every_second, enabled=False)
    admin_client.post(
        reverse("admin:django_celery_beat_periodictask_changelist"),
        {"action": "toggle_tasks", "_selected_action": [first.id, second.id]},
    )
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.enabled, second.enabled) == (False, True)


def test_delete_selected_counts_and_logs_only_the_images_it_deleted(
    admin_client, folders, drop, sweep_and_process
):
    drop(folders["watch"], "waiting.jpg")
    waiting = sweep_and_process(process=False)[0]
    drop(folders["watch"], "done.jpg", image_bytes((300, 200)))
    (done,) = sweep_and_process()
    changelist = reverse("admin:jobs_image_changelist")
    selected = {"action": "delete_selected", "_selected_action": [waiting.id, done.id]}
    confirm = admin_client.post(changelist, selected).content.decode()
    assert "done.jpg" in confirm
    assert "waiting.jpg" not in confirm
    assert "1 image(s) still being processed were kept" in confirm

    response = admin_client.post(changelist, {**selected, "post": "yes"}, follow=True)
    shown = [str(message) for message in response.context["messages"]]
    assert "Successfully deleted 1 image." in shown
    assert list(Image.objects.values_list("name", flat=True)) == ["waiting.jpg"]
    assert LogEntry.objects.filter(action_flag=DELETION).count() == 1


# --- A year of history: pages whose work must not grow with it


def record_history(first: int, schedules: int) -> None:
    """A sweep by each of `schedules` more schedules, each claiming an image of a format of
    its own, and a manual sweep and an upload."""
    for number in range(first, first + schedules):
        sweep = Sweep.objects.create(
            trigger=Sweep.Trigger.SCHEDULE,
            schedule_name=f"every-{number}",
            folder=f"/in/{number}",
            status=Sweep.Status.DONE,
            claimed=1,
        )
        image_row(
            number,
            Image.Status.DONE,
            sweep=sweep,
            schedule_name=sweep.schedule_name,  # as its claim copies it
            format=f"F{number}",
        )
    manual = Sweep.objects.create(trigger=Sweep.Trigger.MANUAL, folder="/in", claimed=1)
    image_row(first + 1000, Image.Status.FAILED, sweep=manual)
    upload = Sweep.objects.create(trigger=Sweep.Trigger.UPLOAD, folder="/up", claimed=1)
    image_row(first + 2000, Image.Status.DONE, sweep=upload, source=Image.Source.UPLOAD)


def table_reads(admin_client, url: str, table: str) -> int:
    """How many times the queries of one page read `table` (subqueries included)."""
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(url).status_code == 200
    pattern = rf'(?:FROM|JOIN) "{table}"'
    return sum(len(re.findall(pattern, query["sql"])) for query in queries.captured_queries)


def test_image_changelist_counts_its_facets_in_passes_that_do_not_grow_with_schedules(
    admin_client,
):
    url = reverse("admin:jobs_image_changelist")
    record_history(0, 2)
    few = table_reads(admin_client, url, "jobs_image")
    record_history(10, 12)
    many = table_reads(admin_client, url, "jobs_image")
    assert many == few
    page = admin_client.get(url).content.decode()
    assert re.search(r"every-15\s*\(1\)", page)
    assert re.search(r"sweep now / command\s*\(2\)", page)
    assert re.search(r"upload page\s*\(2\)", page)
    assert re.search(r"F15\s*\(1\)", page)
    assert re.search(r"none recorded\s*\(4\)", page)
    # Counted within the list as filtered, like Django's own facets.
    page = admin_client.get(url + "?status__exact=failed").content.decode()
    assert re.search(r"sweep now / command\s*\(2\)", page)
    assert re.search(r"upload page\s*\(0\)", page)
    assert re.search(r"every-15\s*\(0\)", page)


def test_image_changelist_counts_and_filters_by_schedule_from_the_images_alone(admin_client):
    record_history(0, 2)
    url = reverse("admin:jobs_image_changelist")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(url).content.decode()
    grouped = [
        query["sql"]
        for query in queries
        if '"jobs_image"."schedule_name"' in query["sql"] and "GROUP BY" in query["sql"]
    ]
    assert len(grouped) == 1
    assert not any('JOIN "jobs_sweep"' in sql for sql in grouped), grouped
    assert re.search(r"every-0\s*\(1\)", page)
    assert re.search(r"sweep now / command\s*\(1\)", page)
    listed = admin_client.get(url + "?schedule=task%3Aevery-0").content.decode()
    assert "0.jpg" in listed
    assert "1.jpg" not in listed
    listed = admin_client.get(url + "?schedule=manual").content.decode()
    assert "1000.jpg" in listed
    assert "2000.jpg" not in listed  # the upload


def test_sweep_changelist_counts_its_schedule_facet_in_one_pass_whatever_the_schedules(
    admin_client,
):
    url = reverse("admin:jobs_sweep_changelist")
    record_history(0, 2)
    few = table_reads(admin_client, url, "jobs_sweep")
    record_history(10, 12)
    many = table_reads(admin_client, url, "jobs_sweep")
    assert many == few
    page = admin_client.get(url).content.decode()
    assert re.search(r"every-15\s*\(1\)", page)


def test_periodic_task_list_reads_last_sweeps_in_queries_that_do_not_grow_with_tasks(
    admin_client, every_second
):
    url = reverse("admin:django_celery_beat_periodictask_changelist")
    record_history(0, 2)
    for name in ("every-0", "every-1", "never-swept-0", "never-swept-1"):
        PeriodicTask.objects.create(name=name, task="jobs.sweep_folder", interval=every_second)
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    for number in range(2, 10):
        PeriodicTask.objects.create(
            name=f"never-swept-{number}", task="jobs.sweep_folder", interval=every_second
        )
    with CaptureQueriesContext(connection) as many:
        page = admin_client.get(url).content.decode()
    assert len(many) == len(few)
    assert "1 claimed" in page


def query_plan(sql: str, params: tuple = ()) -> str:
    """The database's plan for `sql`, as it would read a big table."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # An empty table is read whole whatever its indexes: ask for the plan of a big one.
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
        return " ".join(str(row) for row in cursor.fetchall())


def test_last_sweep_of_a_schedule_is_read_from_an_index_in_date_order():
    last = Sweep.objects.filter(schedule_name="every-0").order_by("-started_at", "-id").values("id")
    plan = query_plan(*last[:1].query.sql_with_params())
    # Without an index in that order, a schedule with no sweep walks every sweep by date
    # (PostgreSQL), or every sweep of the schedule is sorted (SQLite).
    assert "Sort" not in plan
    assert "TEMP B-TREE" not in plan
    assert "Filter" not in plan


def sqlite_steps(function) -> int:
    """Hundreds of virtual-machine steps SQLite takes to run `function`'s queries: the work
    they do, counted alike on every run (unlike their time)."""
    if connection.vendor != "sqlite":
        pytest.skip("counts SQLite's own steps")
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection.ensure_connection()
    connection.connection.set_progress_handler(count, 100)
    try:
        function()
    finally:
        connection.connection.set_progress_handler(None, 100)
    return steps


def swept_before(days: float, count: int, first: int) -> None:
    """`count` sweeps started `days` ago (a second apart), each with a finished image of
    12 MP."""
    for number in range(first, first + count):
        started = timezone.now() - timezone.timedelta(days=days, seconds=number)
        sweep = Sweep.objects.create(
            folder="/in", status=Sweep.Status.DONE, claimed=1, started_at=started
        )
        image_row(
            number, Image.Status.DONE, sweep=sweep, width=4000, height=3000, finished_at=started
        )


def test_throughput_reads_the_last_sweeps_only_whatever_the_history():
    swept_before(1, 10, 0)
    recent = sqlite_steps(stats.recent_throughput)
    swept_before(300, 300, 100)
    with_history = sqlite_steps(stats.recent_throughput)
    assert with_history < 2 * recent
    rows = stats.recent_throughput()
    assert [row.sweep.id for row in rows] == list(
        Sweep.objects.order_by("-started_at").values_list("id", flat=True)[:10]
    )
    assert {(row.images, row.megapixels) for row in rows} == {(1, 12.0)}


def test_image_changelist_lists_the_formats_seen_from_an_index(admin_client):
    record_history(0, 2)
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:jobs_image_changelist")).content.decode()
    assert re.search(r"F1\s*\(1\)", page)
    # The format filter's choices, listed once per filter on the page.
    listing = {
        query["sql"] for query in queries if 'DISTINCT "jobs_image"."format"' in query["sql"]
    }
    assert len(listing) == 1
    plan = query_plan(listing.pop())
    # Read from the index alone, not a pass over every image.
    assert "COVERING INDEX" in plan or "Index Only Scan" in plan


def test_task_result_facets_are_counted_in_one_pass_whatever_the_schedules(admin_client):
    from django_celery_results.models import TaskResult

    def results(first: int, schedules: int) -> None:
        for number in range(first, first + schedules):
            TaskResult.objects.create(
                task_id=f"t{number}", task_name=SWEEP_TASK, periodic_task_name=f"every-{number}"
            )
        TaskResult.objects.create(task_id=f"u{first}", task_name="jobs.make_thumbnails")

    url = reverse("admin:django_celery_results_taskresult_changelist") + "?_facets=True"
    results(0, 2)
    few = table_reads(admin_client, url, "django_celery_results_taskresult")
    results(10, 12)
    many = table_reads(admin_client, url, "django_celery_results_taskresult")
    assert many == few
    page = admin_client.get(url).content.decode()
    assert re.search(r"every-15\s*\(1\)", page)
    assert re.search(r"none \(sent otherwise\)\s*\(2\)", page)


def queued_at_local(zone: str, *moments: str) -> None:
    """An image queued at each local time ("2026-03-29 01:30") in `zone`."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    for number, moment in enumerate(moments):
        at = datetime.fromisoformat(moment).replace(tzinfo=ZoneInfo(zone))
        image_row(number, Image.Status.DONE, queued_at=at, format="PNG" if number % 2 else "")


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "Asia/Kathmandu", "America/St_Johns", "America/Santiago"]
)
def test_date_drill_down_lists_the_periods_django_would_from_the_index(zone):
    # Either side of local midnights, of months and years, and of summer time's start and
    # end, in zones 15 and 30 minutes off whole hours and one whose clocks change at
    # midnight as well.
    queued_at_local(
        zone,
        "2025-12-31 23:59:59",
        "2026-01-01 00:00:00",
        "2026-03-28 23:30:00",
        "2026-03-29 03:30:00",
        "2026-03-31 23:59:00",
        "2026-04-01 00:01:00",
        "2026-10-25 02:30:00",
        "2026-10-25 23:59:59",
        "2026-11-30 00:00:00",
        # Santiago's clocks change at midnight: one day has none, one has two.
        "2026-04-04 23:59:00",
        "2026-04-05 00:30:00",
        "2026-09-05 23:59:00",
        "2026-09-06 01:30:00",
    )
    with timezone.override(zone):
        for kind in ("year", "month", "day"):
            for order in ("ASC", "DESC"):
                for rows in (Image.objects.all(), Image.objects.exclude(format="")):
                    walked = list(rows.datetimes("queued_at", kind, order))
                    truncated = list(QuerySet.datetimes(rows, "queued_at", kind, order))
                    assert walked == truncated, (kind, order)
                    assert walked
    # In another zone than the current one, when asked.
    from zoneinfo import ZoneInfo

    other = ZoneInfo("Pacific/Auckland")
    assert list(Image.objects.datetimes("queued_at", "day", tzinfo=other)) == list(
        QuerySet.datetimes(Image.objects.all(), "queued_at", "day", tzinfo=other)
    )


def test_date_drill_down_of_the_images_list_does_not_grow_with_the_rows(admin_client):
    at = timezone.localtime(timezone.now()).replace(hour=12)
    midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)

    def one_day(count: int, first: int) -> None:
        for number in range(first, first + count):
            image_row(number, Image.Status.DONE, queued_at=at)

    def drill_down() -> None:
        assert list(Image.objects.datetimes("queued_at", "day")) == [midnight]

    one_day(10, 0)
    few = sqlite_steps(drill_down)
    one_day(400, 100)
    many = sqlite_steps(drill_down)
    # Truncating the date of every row would take forty times the steps.
    assert many <= few + 1, (few, many)
    page = admin_client.get(reverse("admin:jobs_image_changelist")).content.decode()
    assert f"queued_at__day={at.day}" in page

    # Within a year shown (a lower bound of the list's own), the months after a busy one.
    year = at.year - 1
    start = timezone.make_aware(timezone.datetime(year, 1, 1))
    in_the_year = Image.objects.filter(
        queued_at__gte=start, queued_at__lt=start.replace(year=year + 1)
    )

    def months() -> None:
        assert len(list(in_the_year.datetimes("queued_at", "month"))) == 2

    image_row(1000, Image.Status.DONE, queued_at=start.replace(month=3))
    for number in range(1001, 1011):
        image_row(number, Image.Status.DONE, queued_at=start.replace(day=15))
    few = sqlite_steps(months)
    for number in range(2000, 2400):
        image_row(number, Image.Status.DONE, queued_at=start.replace(day=15))
    many = sqlite_steps(months)
    assert many <= few + 1, (few, many)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("zone", "moments"),
    [
        # St John's turned its clocks back at 00:01 until 2011, to 23:01 the day before: the
        # first minute of 7 November 2010 came, then an hour of the 6th again.
        ("America/St_Johns", ["2010-11-07 02:00:00+00:00", "2010-11-07 03:00:00+00:00"]),
        ("America/St_Johns", ["2010-11-07 02:30:30+00:00", "2010-11-07 03:00:00+00:00"]),
        # The last dates there are, in any zone.
        ("UTC", ["9999-12-31 12:00:00+00:00"]),
        ("America/New_York", ["9999-12-31 12:00:00+00:00"]),
    ],
)
def test_date_drill_down_matches_django_where_clocks_go_back_across_midnight_or_dates_end(
    admin_client, zone, moments
):
    from datetime import datetime

    for number, moment in enumerate(moments):
        image_row(number, Image.Status.DONE, queued_at=datetime.fromisoformat(moment))
    with timezone.override(zone):
        for kind in ("year", "month", "day"):
            walked = list(Image.objects.datetimes("queued_at", kind))
            assert walked == list(QuerySet.datetimes(Image.objects.all(), "queued_at", kind))
        # The list drills down to the month of them at once: its days.
        assert admin_client.get(reverse("admin:jobs_image_changelist")).status_code == 200

"""The upload page, JSON status endpoints and files served from the zips (Django test client).

Images are processed by calling the task body directly; the real worker is exercised in the
integration and browser tests.
"""

from __future__ import annotations

import datetime
import io
import os
import secrets
import signal
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.db import IntegrityError, connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from PIL import Image as PILImage

from jobs import retention, runner, views
from jobs.broker import queue_length
from jobs.models import Image, Sweep
from jobs.sweeper import recover_unswept

from .conftest import image_bytes
from .test_pipeline_formats import corrupt_avif

pytestmark = pytest.mark.django_db


def named(name: str, data: bytes, content_type: str = "image/jpeg") -> io.BytesIO:
    handle = io.BytesIO(data)
    handle.name = name
    return handle


@pytest.fixture
def alice(client: Client) -> User:
    user = User.objects.create_user("alice")
    client.force_login(user)
    return user


def upload(client: Client, *files: io.BytesIO, sizes: str = "64x64, 32x32") -> dict:
    response = client.post(reverse("jobs:upload"), {"images": list(files), "sizes": sizes})
    return {"status": response.status_code, **response.json()}


def process_all(ids: list[int]) -> None:
    for image_id in ids:
        runner.process_image(image_id)


def test_upload_page_requires_login(client, folders):
    response = client.get(reverse("jobs:upload-page"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("jobs:login"))


def test_upload_page_shows_form_and_limits(client, folders, alice):
    response = client.get(reverse("jobs:upload-page"))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="upload-form"' in page
    assert "128x128, 256x256, 512x512" in page
    assert "csrfmiddlewaretoken" in page


def test_upload_api_requires_login_with_json_401(client, folders):
    response = client.post(reverse("jobs:upload"), {})
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required"}


def test_upload_refuses_a_post_without_csrf_token(folders, alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    response = strict.post(
        reverse("jobs:upload"), {"images": [named("a.jpg", image_bytes())], "sizes": "64x64"}
    )
    assert response.status_code == 403


def test_upload_claims_files_as_upload_images_of_their_owner(
    client, folders, alice, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        body = upload(
            client,
            named("holiday photo.jpg", image_bytes((400, 300))),
            named("logo.png", image_bytes((100, 100), "RGBA", "PNG", (0, 0, 255, 128))),
        )
    assert body["status"] == 201
    assert len(callbacks) == 1  # one queueing, after the commit
    sweep = Sweep.objects.get(id=body["sweep"]["id"])
    assert sweep.trigger == Sweep.Trigger.UPLOAD
    assert sweep.requested_by == alice
    assert sweep.claimed == 2
    images = list(Image.objects.order_by("id"))
    assert [image.name for image in images] == ["holiday photo.jpg", "logo.png"]
    for image in images:
        assert image.source == Image.Source.UPLOAD
        assert image.uploaded_by == alice
        assert image.sizes == ["64x64", "32x32"]
        assert Path(image.source_path).is_relative_to(folders["media"] / "uploads")
        assert Path(image.source_path).is_file()
    assert "task_id" not in str(body)


def test_upload_two_files_of_one_name_keeps_both(client, folders, alice):
    body = upload(client, named("a.jpg", image_bytes()), named("a.jpg", image_bytes((10, 10))))
    assert body["status"] == 201
    assert sorted(Image.objects.values_list("name", flat=True)) == ["a (2).jpg", "a.jpg"]


def test_upload_rejects_files_that_are_not_images_with_a_reason(client, folders, alice):
    body = upload(client, named("notes.txt", b"hello there"))
    assert body["status"] == 400
    assert body["rejected"][0]["name"] == "notes.txt"
    assert "not an image" in body["rejected"][0]["error"]
    assert not Image.objects.exists()


def test_upload_takes_the_good_files_and_reports_the_bad(client, folders, alice):
    body = upload(client, named("good.jpg", image_bytes()), named("empty.jpg", b""))
    assert body["status"] == 201
    assert [image["name"] for image in body["sweep"]["images"]] == ["good.jpg"]
    assert body["rejected"][0]["name"] == "empty.jpg"
    assert "empty" in body["rejected"][0]["error"]


def test_upload_rejects_a_corrupt_avif_and_takes_the_rest(client, folders, alice):
    body = upload(client, named("broken.avif", corrupt_avif()), named("good.jpg", image_bytes()))
    assert body["status"] == 201
    assert [image["name"] for image in body["sweep"]["images"]] == ["good.jpg"]
    assert body["rejected"][0]["name"] == "broken.avif"
    assert "corrupt image header" in body["rejected"][0]["error"]


def test_upload_rejects_too_many_pixels(client, folders, alice, settings):
    settings.MAX_IMAGE_PIXELS = 1000
    body = upload(client, named("big.png", image_bytes((100, 100), fmt="PNG")))
    assert body["status"] == 400
    assert "pixel" in body["rejected"][0]["error"]


def test_upload_rejects_too_many_bytes(client, folders, alice, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    body = upload(client, named("big.jpg", image_bytes((400, 400))))
    assert body["status"] == 400
    assert "over the limit of 1000" in body["rejected"][0]["error"]


def test_upload_rejects_too_many_files(client, folders, alice, settings):
    settings.UPLOAD_MAX_FILES = 2
    body = upload(client, *(named(f"{n}.jpg", image_bytes((8, 8))) for n in range(3)))
    assert body["status"] == 400
    assert "at most 2 per upload" in body["errors"]["images"][0]["message"]


def test_upload_rejects_bad_sizes(client, folders, alice):
    body = upload(client, named("a.jpg", image_bytes()), sizes="big")
    assert body["status"] == 400
    assert "not a size like 128x128" in body["errors"]["sizes"][0]["message"]


@pytest.mark.parametrize(("preset", "served"), [("webp", "image/webp"), ("avif", "image/avif")])
def test_thumbnails_are_served_as_their_format(client, folders, alice, preset, served):
    response = client.post(
        reverse("jobs:upload"),
        {"images": [named("photo.jpg", image_bytes())], "sizes": "64x64", "format": preset},
    )
    assert response.status_code == 201, response.content
    status_url = response.json()["status_url"]
    process_all([image["id"] for image in response.json()["sweep"]["images"]])
    (image,) = client.get(status_url).json()["images"]
    thumb = client.get(image["thumbnails"][0]["url"])
    assert thumb["Content-Type"] == served
    assert PILImage.open(io.BytesIO(thumb.content)).format == preset.upper()


def test_thumbnails_of_a_zip_made_before_members_took_their_real_size_are_served(
    admin_client, folders, drop, sweep_and_process
):
    # Releases before output presets named each member after its box (photo_64x64.jpg for a
    # 64x48 thumbnail); their zips stay on disk through an upgrade.
    drop(folders["watch"], "photo.jpg", image_bytes((400, 300)))
    (photo,) = sweep_and_process(folders["watch"], ["64x64", "128x128"])
    path = folders["media"] / photo.archive
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name.replace("_64x48", "_64x64").replace("_128x96", "_128x128"), data)

    for label, size in [("64x64", (64, 48)), ("128x128", (128, 96))]:
        thumb = admin_client.get(reverse("jobs:thumbnail", args=[photo.id, label]))
        assert thumb.status_code == 200
        assert PILImage.open(io.BytesIO(thumb.content)).size == size


def test_sweep_status_follows_uploads_to_done_with_zip_and_thumbnails(client, folders, alice):
    body = upload(client, named("photo.jpg", image_bytes((400, 300))), sizes="64x64, 200x200")
    status_url = body["status_url"]
    assert client.get(status_url).json()["counts"]["pending"] == 1
    process_all([image["id"] for image in body["sweep"]["images"]])

    sweep = client.get(status_url).json()
    assert sweep["over"] is True
    assert sweep["progress"] == 100
    image = sweep["images"][0]
    assert image["status"] == "done"
    assert [(t["size"], t["width"], t["height"]) for t in image["thumbnails"]] == [
        ("64x64", 64, 48),
        ("200x200", 200, 150),
    ]
    archive = client.get(image["archive_url"])
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(b"".join(archive.streaming_content))) as zipped:
        assert sorted(zipped.namelist()) == ["photo.jpg", "photo_200x150.jpg", "photo_64x48.jpg"]
    thumb = client.get(image["thumbnails"][0]["url"])
    assert thumb.status_code == 200
    assert thumb["Content-Type"] == "image/jpeg"
    assert PILImage.open(io.BytesIO(thumb.content)).size == (64, 48)
    assert client.get(image["status_url"]).json()["status"] == "done"


def test_status_and_files_of_an_upload_are_hidden_from_other_users(client, folders, alice):
    body = upload(client, named("mine.jpg", image_bytes()))
    image_id = body["sweep"]["images"][0]["id"]
    process_all([image_id])
    bob = User.objects.create_user("bob")
    client.force_login(bob)
    assert client.get(body["status_url"]).status_code == 404
    assert client.get(reverse("jobs:image-status", args=[image_id])).status_code == 404
    assert client.get(reverse("jobs:archive", args=[image_id])).status_code == 404
    assert client.get(reverse("jobs:thumbnail", args=[image_id, "64x64"])).status_code == 404
    assert "mine.jpg" not in client.get(reverse("jobs:upload-page")).content.decode()


def test_staff_see_every_upload_with_admin_links(client, folders, alice, admin_client):
    body = upload(client, named("mine.jpg", image_bytes()))
    image_id = body["sweep"]["images"][0]["id"]
    data = admin_client.get(reverse("jobs:image-status", args=[image_id])).json()
    assert data["name"] == "mine.jpg"
    assert data["admin_url"] == reverse("admin:jobs_image_change", args=[image_id])


def test_duplicate_upload_downloads_the_first_zip_under_its_own_name(client, folders, alice):
    photo = image_bytes((300, 200))
    first = upload(client, named("theirs.jpg", photo), sizes="50x50")
    process_all([first["sweep"]["images"][0]["id"]])
    bob = User.objects.create_user("bob")
    client.force_login(bob)
    second = upload(client, named("mine.jpg", photo), sizes="50x50")
    image_id = second["sweep"]["images"][0]["id"]
    process_all([image_id])

    data = client.get(reverse("jobs:image-status", args=[image_id])).json()
    assert data["status"] == "duplicate"
    assert "duplicate_of" not in data
    archive = client.get(data["archive_url"])
    with zipfile.ZipFile(io.BytesIO(b"".join(archive.streaming_content))) as zipped:
        assert sorted(zipped.namelist()) == ["mine.jpg", "mine_50x33.jpg"]
        assert zipped.read("mine.jpg") == photo
    assert client.get(data["thumbnails"][0]["url"]).status_code == 200
    # Each person's zip, the first one's as the duplicate's, kept by no shared cache.
    assert archive["Cache-Control"] == "private, no-cache"
    client.force_login(alice)
    own = client.get(reverse("jobs:archive", args=[first["sweep"]["images"][0]["id"]]))
    own.close()
    assert own.status_code == 200
    assert own["Cache-Control"] == "private, no-cache"


def test_duplicate_download_never_holds_a_whole_original_in_memory(client, folders, alice):
    buffer = io.BytesIO()
    noise = PILImage.frombytes("RGB", (2900, 2900), os.urandom(2900 * 2900 * 3))
    noise.save(buffer, "PNG", compress_level=0)
    big = buffer.getvalue()  # about 25 MB, over the 16 MB the renamed zip keeps in memory
    first = upload(client, named("theirs.png", big), sizes="64x64")
    process_all([first["sweep"]["images"][0]["id"]])
    second = upload(client, named("mine.png", big), sizes="64x64")
    image_id = second["sweep"]["images"][0]["id"]
    process_all([image_id])

    tracemalloc.start()
    try:
        response = client.get(reverse("jobs:archive", args=[image_id]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as zipped:
        assert zipped.read("mine.png") == big
    response.close()
    assert peak < len(big)


def test_duplicate_whose_first_zip_retention_deleted_links_to_no_zip(
    client, folders, alice, settings, admin_client
):
    photo = image_bytes((300, 200))
    first = upload(client, named("first.jpg", photo), sizes="50x50")
    process_all([first["sweep"]["images"][0]["id"]])
    second = upload(client, named("second.jpg", photo), sizes="50x50")
    image_id = second["sweep"]["images"][0]["id"]
    process_all([image_id])
    settings.KEEP_ARCHIVES_DAYS = 1
    later = timezone.now() + datetime.timedelta(days=3)
    assert retention.apply_retention(now=later).archives == 1

    data = client.get(reverse("jobs:image-status", args=[image_id])).json()
    assert data["status"] == "duplicate"
    assert (data["archive_url"], data["preview_url"], data["thumbnails"]) == (None, None, [])
    assert client.get(reverse("jobs:archive", args=[image_id])).status_code == 404
    page = admin_client.get(reverse("admin:jobs_image_change", args=[image_id])).content.decode()
    assert reverse("jobs:archive", args=[image_id]) not in page
    assert f"/images/{image_id}/thumbnails/" not in page


def test_image_status_never_publishes_and_recovery_requeues_a_lost_upload(
    client, folders, alice, broker
):
    body = upload(client, named("a.jpg", image_bytes()))
    image_id = body["sweep"]["images"][0]["id"]
    Image.objects.filter(id=image_id).update(queued_at="2000-01-01T00:00:00Z")
    assert queue_length() == 0  # no commit in this test: no send ran

    assert client.get(reverse("jobs:image-status", args=[image_id])).json()["status"] == "pending"
    assert client.get(body["status_url"]).status_code == 200

    # A status request only reads; the lost message is jobs.recover's business.
    assert queue_length() == 0
    assert Image.objects.get(id=image_id).queued_at.year == 2000
    assert recover_unswept().requeue == [image_id]


def test_image_status_answers_with_the_broker_down(client, folders, alice, broker):
    body = upload(client, named("a.jpg", image_bytes()))
    image_id = body["sweep"]["images"][0]["id"]
    Image.objects.filter(id=image_id).update(queued_at="2000-01-01T00:00:00Z")
    broker.stop()
    assert client.get(reverse("jobs:image-status", args=[image_id])).status_code == 200
    assert client.get(body["status_url"]).status_code == 200


def test_upload_answers_while_the_broker_hangs(
    client, folders, alice, broker, django_capture_on_commit_callbacks
):
    """A Redis that stops answering but keeps its connections (frozen, failed over) must not
    hold the upload's request: it stands, and jobs.recover queues it later."""
    os.kill(broker.pid, signal.SIGSTOP)
    # Thaws it in any case, so that a request held forever still ends the test.
    thaw = threading.Timer(30, os.kill, (broker.pid, signal.SIGCONT))
    thaw.start()
    started = time.monotonic()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            body = upload(client, named("a.jpg", image_bytes()))
    finally:
        thaw.cancel()
        os.kill(broker.pid, signal.SIGCONT)
    assert body["status"] == 201
    assert time.monotonic() - started < 15
    assert Image.objects.get(id=body["sweep"]["images"][0]["id"]).status == Image.Status.PENDING


def test_upload_records_exactly_the_files_it_saved(client, folders, alice):
    body = upload(client, named("a.jpg", image_bytes()), named("b.png", image_bytes(fmt="PNG")))
    assert body["status"] == 201
    sweep = Sweep.objects.get(id=body["sweep"]["id"])
    folder = Path(sweep.folder)
    images = list(Image.objects.filter(sweep=sweep))
    assert sorted(path.name for path in folder.iterdir()) == ["a.jpg", "b.png"]  # no .part
    for image in images:
        path = Path(image.source_path)
        assert path.parent == folder
        assert image.folder == sweep.folder
        assert (image.file_size, image.mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)
    assert sweep.claimed == len(images) == 2


@pytest.mark.django_db(transaction=True)
def test_upload_writes_its_files_before_taking_the_write_lock(client, folders, alice):
    if connection.vendor != "sqlite":
        pytest.skip("checks SQLite's BEGIN IMMEDIATE")
    uploads = folders["media"] / "uploads"
    files_at_begin: list[list[str]] = []

    def watch(execute, sql, params, many, context):
        if sql.upper().startswith("BEGIN"):
            files_at_begin.append(sorted(p.name for p in uploads.rglob("*") if p.is_file()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):
        body = upload(client, named("a.jpg", image_bytes()), named("b.jpg", image_bytes((9, 9))))
    assert body["status"] == 201
    # One transaction, and both files were complete on disk before it began.
    assert files_at_begin == [["a.jpg", "b.jpg"]]


def test_upload_that_cannot_be_recorded_leaves_no_files(client, folders, alice):
    if connection.vendor != "sqlite":
        pytest.skip("the refusing trigger is written for SQLite")
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TRIGGER refuse_images BEFORE INSERT ON jobs_image "
            "BEGIN SELECT RAISE(ABORT, 'no more images'); END"
        )
    with pytest.raises(IntegrityError):
        upload(client, named("a.jpg", image_bytes()), named("b.jpg", image_bytes((10, 10))))
    assert not Sweep.objects.exists()
    assert not Image.objects.exists()
    uploads = folders["media"] / "uploads"
    assert [path for path in uploads.rglob("*") if not path.is_dir()] == []
    # Only the year/month/day folders stay; the upload's own folder went with its files.
    assert [path for path in uploads.rglob("*") if len(path.relative_to(uploads).parts) > 3] == []


def test_sweeps_of_others_are_shown_to_staff_who_may_view_sweeps_only(
    client, folders, drop, sweep_and_process
):
    drop(folders["watch"], "photo.jpg")
    sweep = sweep_and_process(process=False)[0].sweep
    sweep.task_id = "the-task"
    sweep.save(update_fields=["task_id"])
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_image"))
    client.force_login(viewer)
    # The admin refuses this person the sweeps' pages: their JSON tells no more.
    assert client.get(reverse("admin:jobs_sweep_change", args=[sweep.id])).status_code == 403
    assert client.get(reverse("jobs:sweep-status", args=[sweep.id])).status_code == 404
    assert client.get(reverse("jobs:sweep-by-task", args=["the-task"])).status_code == 404

    viewer.user_permissions.add(Permission.objects.get(codename="view_sweep"))
    client.force_login(User.objects.get(id=viewer.id))  # permissions are cached per object
    assert client.get(reverse("jobs:sweep-status", args=[sweep.id])).json()["folder"]
    assert client.get(reverse("jobs:sweep-by-task", args=["the-task"])).json()["id"] == sweep.id


def test_image_status_hides_server_paths_from_non_staff(client, folders, alice, admin_client):
    body = upload(client, named("holiday photo.jpg", image_bytes()))
    image_id = body["sweep"]["images"][0]["id"]
    source = Path(Image.objects.get(id=image_id).source_path)
    source.unlink()  # the file vanishes before it is read: the error names its path
    assert runner.process_image(image_id) == Image.Status.FAILED
    assert str(source) in Image.objects.get(id=image_id).error

    media = str(folders["media"])
    status_url = reverse("jobs:image-status", args=[image_id])
    mine = client.get(status_url).json()
    assert media not in mine["error"]
    assert "'holiday photo.jpg'" in mine["error"]
    sweep = client.get(body["status_url"]).json()
    assert media not in sweep["images"][0]["error"]
    page = client.get(reverse("jobs:upload-page")).content.decode()
    assert "file vanished" in page
    assert media not in page
    assert admin_client.get(status_url).json()["error"] == Image.objects.get(id=image_id).error


def test_without_server_paths_cuts_media_and_folder_paths_to_their_last_part(settings):
    settings.MEDIA_ROOT = Path("/srv/media")
    text = (
        "missing from /srv/media/originals/2025/01/02/7-a.jpg; read '/data/My Photos/b c.png' "
        "in /data/My Photos; not /srv/media2/x.jpg"
    )
    assert views.without_server_paths(text, ["/data/My Photos"]) == (
        "missing from 7-a.jpg; read 'b c.png' in My Photos; not /srv/media2/x.jpg"
    )


def test_login_page_logs_in_a_non_staff_user_and_returns_to_the_upload_page(client, folders):
    password = secrets.token_urlsafe()
    User.objects.create_user("carol", password=password)
    response = client.post(reverse("jobs:login"), {"username": "carol", "password": password})
    assert response.status_code == 302
    assert response.url == reverse("jobs:upload-page")

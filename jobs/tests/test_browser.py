"""What a person does, in a real headless Chromium against the whole running system.

gunicorn, a Celery worker and beat (subprocesses, like `make run`) and the bundled Redis, on
the file-backed test database. Screenshots of the key pages go to test-artifacts/.
"""

from __future__ import annotations

import io
import json
import secrets
import zipfile

import pytest
from django.contrib.auth.models import User
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from PIL import Image as PILImage

from jobs.models import Image, Sweep

from .browser import chromium_page, require_chromium, screenshot, start_web
from .conftest import image_bytes
from .processes import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = secrets.token_urlsafe()


@pytest.fixture(autouse=True)
def chromium(monkeypatch):
    require_chromium()
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test
    # itself are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def admin_login(page) -> None:
    page.goto("/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")


def images_done(folder, count: int) -> list[Image]:
    images = list(
        Image.objects.filter(
            folder=str(folder), status=Image.Status.DONE, in_folder=False
        ).order_by("name")
    )
    return images if len(images) >= count else []


def previews_loaded(page) -> bool:
    return page.evaluate(
        """() => {
            const images = Array.from(document.querySelectorAll("img.parroter-preview"));
            return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0);
        }"""
    )


def test_admin_adds_a_folder_schedule_then_reviews_reprocesses_and_sweeps(
    system, folders, drop, tmp_path
):
    User.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    system.worker()
    system.beat()
    base_url = start_web(system)
    manual = folders["root"] / "manual"
    drop(manual, "manual.jpg", image_bytes((600, 600)))  # settled by the time it is swept

    with chromium_page(base_url) as page:
        admin_login(page)
        assert page.locator(".parroter-start").is_visible()
        screenshot(page, "admin-index")

        # An interval, then a periodic sweep of the second folder, through the admin forms.
        page.goto("/admin/django_celery_beat/intervalschedule/add/")
        page.fill("#id_every", "1")
        page.select_option("#id_period", "seconds")
        page.click("input[name=_save]")
        page.wait_for_url("**/intervalschedule/")
        interval = IntervalSchedule.objects.latest("id")

        page.goto("/admin/django_celery_beat/periodictask/add/")
        assert page.input_value("#id_regtask") == "jobs.sweep_folder"
        page.fill("#id_name", "Second folder")
        page.fill("#id_folder", str(folders["other"]))
        page.fill("#id_sizes", "40x30, 20x20")
        page.select_option("#id_interval", str(interval.id))
        screenshot(page, "periodic-task-form")
        page.click("input[name=_save]")
        page.wait_for_url("**/periodictask/")
        assert PeriodicTask.objects.filter(name="Second folder").exists()
        screenshot(page, "periodic-task-list")

        drop(folders["other"], "wide.jpg", image_bytes((800, 200)))
        drop(folders["other"], "square.png", image_bytes((300, 300), "RGB", "PNG", (0, 90, 200)))
        wait_for(lambda: images_done(folders["other"], 2), timeout=60, what="both images done")

        # The list: previews from the zips and the sizes made.
        page.goto("/admin/jobs/image/?schedule=task%3ASecond+folder")
        rows = page.locator("#result_list tbody tr")
        assert rows.count() == 2
        page.wait_for_function(
            """() => Array.from(document.querySelectorAll("img.parroter-preview"))
                .every((i) => i.complete && i.naturalWidth > 0)"""
        )
        assert previews_loaded(page)
        text = page.inner_text("#result_list")
        assert "20×5, 40×10" in text  # wide.jpg
        assert "20×20, 30×30" in text  # square.png
        screenshot(page, "image-list")

        # The detail page: every thumbnail, the zip's contents, the download.
        wide = Image.objects.get(name="wide.jpg")
        page.goto(f"/admin/jobs/image/{wide.id}/change/")
        assert page.locator(".parroter-gallery img").count() == 2
        assert "wide_40x10.jpg" in page.inner_text(".field-zip_contents")
        screenshot(page, "image-detail")
        with page.expect_download() as download:
            page.click("a.button:has-text('Download zip')")
        saved = tmp_path / "wide.zip"
        download.value.save_as(saved)
        with zipfile.ZipFile(saved) as archive:
            assert sorted(archive.namelist()) == ["wide.jpg", "wide_20x5.jpg", "wide_40x10.jpg"]

        # Reprocess from the list with a new size.
        page.goto("/admin/jobs/image/")
        page.check(f"input[name=_selected_action][value='{wide.id}']")
        page.select_option("select[name=action]", "reprocess")
        page.click("button[name=index]")
        page.wait_for_url("**/image/reprocess/**")
        page.fill("#id_sizes", "64x64")
        page.click("#reprocess-submit")
        page.wait_for_url(f"**/image/{wide.id}/change/")
        wait_for(
            lambda: Image.objects.filter(
                id=wide.id, status=Image.Status.DONE, thumbnails={"64x64": [64, 16]}
            ).exists(),
            timeout=30,
            what="the reprocessed image",
        )
        page.reload()
        assert "wide_64x16.jpg" in page.inner_text(".field-zip_contents")
        assert page.locator(".parroter-gallery img").count() == 1

        # Sweep now: a folder with no schedule, with its own size, and its progress.
        page.goto("/admin/jobs/sweep/")
        page.click("text=Sweep now")
        assert page.input_value("#id_folder") == str(folders["watch"])
        page.fill("#id_folder", str(manual))
        page.fill("#id_sizes", "30x30")
        page.click("#sweep-now-submit")
        page.wait_for_selector("[data-over=true]", timeout=30_000)
        assert "Done: 1 image(s) — 1 done" in page.inner_text("#sweep-state")
        assert page.locator("#sweep-images tbody tr[data-status=done]").count() == 1
        page.wait_for_timeout(400)  # the bar's transition
        screenshot(page, "sweep-now-progress")
        manual_image = Image.objects.get(name="manual.jpg")
        assert manual_image.thumbnails == {"30x30": [30, 30]}
        assert manual_image.sweep.trigger == Sweep.Trigger.MANUAL

        page.goto("/admin/dashboard/")
        assert page.locator("#hourly-chart rect.done").count() == 48
        assert "unavailable" not in page.inner_text("#queue-tile")
        screenshot(page, "dashboard")


def test_upload_page_uploads_two_images_and_offers_their_zips(system, folders, tmp_path):
    User.objects.create_user("uploader", password=PASSWORD)
    system.worker()
    base_url = start_web(system)
    photo = image_bytes((1200, 800))
    logo = image_bytes((256, 256), "RGBA", "PNG", (200, 0, 120, 160))

    with chromium_page(base_url) as page:
        page.goto("/")
        page.wait_for_url("**/login/**")
        page.fill("#id_username", "uploader")
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#upload-form")
        screenshot(page, "upload-page")

        page.set_input_files(
            "#id_images",
            files=[
                {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": photo},
                {"name": "logo.png", "mimeType": "image/png", "buffer": logo},
            ],
        )
        page.fill("#id_sizes", "100x100, 50x50")
        page.click("#upload-button")
        page.wait_for_selector("#upload-progress[data-over=true]", timeout=60_000)
        assert page.locator(".job[data-status=done]").count() == 2
        page.wait_for_function(
            """() => Array.from(document.querySelectorAll(".job .thumbs img"))
                .every((i) => i.complete && i.naturalWidth > 0)"""
        )
        assert page.locator(".job .thumbs img").count() == 4
        assert "All 2 finished: 2 done" in page.inner_text("#upload-state")
        screenshot(page, "upload-done")

        card = page.locator(".job", has_text="photo.jpg")
        with page.expect_download() as download:
            card.locator("a.download").click()
        saved = tmp_path / "photo.zip"
        download.value.save_as(saved)
        with zipfile.ZipFile(saved) as archive:
            assert sorted(archive.namelist()) == [
                "photo.jpg",
                "photo_100x67.jpg",
                "photo_50x33.jpg",
            ]
            assert archive.read("photo.jpg") == photo

        # A file that is not an image is refused with its reason.
        page.set_input_files(
            "#id_images", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}]
        )
        page.click("#upload-button")
        page.wait_for_selector("#form-errors:not([hidden])")
        assert "notes.txt: not an image" in page.inner_text("#form-errors")

        # Signed out meanwhile (another tab, an expired session): the page says what to do.
        page.context.clear_cookies()
        page.set_input_files(
            "#id_images", files=[{"name": "late.jpg", "mimeType": "image/jpeg", "buffer": photo}]
        )
        page.click("#upload-button")
        page.wait_for_function(
            "() => document.querySelector('#form-errors').innerText.includes('sign in again')"
        )

    uploads = Image.objects.filter(source=Image.Source.UPLOAD)
    assert uploads.count() == 2
    assert {image.uploaded_by.username for image in uploads} == {"uploader"}


def test_admin_schedule_with_an_output_preset_makes_webp_covers_of_a_heic(system, folders, drop):
    User.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    system.worker()
    system.beat()
    base_url = start_web(system)
    interval = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)

    with chromium_page(base_url) as page:
        admin_login(page)
        page.goto("/admin/django_celery_beat/periodictask/add/")
        page.fill("#id_name", "Phone photos")
        page.fill("#id_folder", str(folders["other"]))
        page.fill("#id_sizes", "64x64, 32x48")
        page.select_option("#id_format", "webp")
        page.select_option("#id_fit", "cover")
        page.select_option("#id_metadata", "keep")
        page.select_option("#id_interval", str(interval.id))
        screenshot(page, "periodic-task-preset")
        page.click("input[name=_save]")
        page.wait_for_url("**/periodictask/")
        task = PeriodicTask.objects.get(name="Phone photos")
        assert json.loads(task.kwargs) == {
            "folder": str(folders["other"]),
            "sizes": ["64x64", "32x48"],
            "format": "webp",
            "fit": "cover",
            "metadata": "keep",
        }
        assert "format webp, fit cover, metadata keep" in page.inner_text("#result_list")

        # A phone photo, taken on its side: HEIC, turned by its container.
        photo = PILImage.new("RGB", (300, 200), (0, 90, 200))
        exif = PILImage.Exif()
        exif[0x0112] = 6
        buffer = io.BytesIO()
        photo.transpose(PILImage.Transpose.ROTATE_90).save(
            buffer, "HEIF", quality=90, exif=exif.tobytes()
        )
        drop(folders["other"], "IMG_0042.HEIC", buffer.getvalue())
        (image,) = wait_for(lambda: images_done(folders["other"], 1), timeout=60, what="done")
        assert (
            image.options
            == image.sweep.options
            == {
                "format": "webp",
                "fit": "cover",
                "metadata": "keep",
            }
        )
        assert (image.format, image.width, image.height) == ("HEIF", 300, 200)
        assert image.thumbnails == {"64x64": [64, 64], "32x48": [32, 48]}
        with zipfile.ZipFile(folders["media"] / image.archive) as archive:
            assert sorted(archive.namelist()) == [
                "IMG_0042.heic",
                "IMG_0042_32x48.webp",
                "IMG_0042_64x64.webp",
            ]

        page.goto(f"/admin/jobs/image/{image.id}/change/")
        assert "fit cover, format webp, metadata keep" in page.inner_text("body")
        assert page.locator(".parroter-gallery img").count() == 2

"""The admin on a 1366 by 768 laptop screen, in a real headless Chromium.

Every list must show its key columns without sideways scrolling, with the data that stretches
it most: long nested folder paths, many sizes, long names and errors. The data is made by the
real system (a worker and beat on the bundled Redis, gunicorn serving the pages), and every
page is screenshotted into test-artifacts/.
"""

from __future__ import annotations

import json
import re
import secrets

import pytest
from django.contrib.auth.models import User
from django.template.defaultfilters import filesizeformat
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult

from jobs.models import Image, Sweep

from .browser import chromium_page, require_chromium, screenshot, start_web
from .conftest import image_bytes
from .processes import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = secrets.token_urlsafe()
WIDTH, HEIGHT = 1366, 768
SCHEDULE = "ACME International — retouched exports of the summer campaign photo shoots"
DEEP = "customers/acme-corporation-international/2026/photo-shoots/summer-campaign/retouched"
SIZES = ["32x32", "64x64", "96x96", "128x128", "160x120", "256x256", "320x240", "512x512"]
LONG_NAMES = [
    "camera-a/day-01/morning/IMG_20260712_134501_HDR_edited_final_version_for_print_v3.jpg",
    "camera-a/day-01/afternoon/IMG_20260712_161022_panorama_stitched_from_twelve_frames.png",
    "camera-b/second-unit/behind-the-scenes/DSC09876-crew-setting-up-the-reflectors.webp",
    "averyveryverylongfilenamewithoutanyseparatorsatallbecausesomecamerasdothat0001.jpg",
    "short.jpg",
]
COPY = "camera-b/copies/the-same-photo-again-under-another-long-name.jpg"
BROKEN = "camera-b/broken/transfer-interrupted-half-written-file.jpg"
# The columns a person looks for on each list.
LISTS = {
    "image": (
        "/admin/jobs/image/",
        ["preview", "name_display", "status_badge", "sizes_made", "archive_size_display"],
    ),
    "sweep": ("/admin/jobs/sweep/", ["started", "status_badge", "seen", "claimed_link"]),
    "periodic-task": (
        "/admin/django_celery_beat/periodictask/",
        ["name", "next_run", "last_sweep"],
    ),
    "task-result": (
        "/admin/django_celery_results/taskresult/",
        ["task", "status_badge", "completed", "periodic_task_name"],
    ),
}
# With the sidebar closed (how a 1366 px screen starts) every column fits, not only the key ones.
EVERY_COLUMN = {
    "image": ["schedule", "finished"],
    "sweep": ["sent_by", "folder_display", "others", "short_error"],
    "periodic-task": ["enabled", "schedule_display", "sweeps", "owner"],
    "task-result": ["arguments", "worker"],
}


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


def layout(page, columns: list[str]) -> dict:
    """Where the page, the list and each column header lie (CSS pixels)."""
    return page.evaluate(
        """(columns) => {
            const results = document.querySelector("#changelist .results");
            const shown = results.getBoundingClientRect();
            const headers = {};
            for (const name of columns) {
                const th = document.querySelector(`#result_list thead th.column-${name}`);
                const box = th && th.getBoundingClientRect();
                headers[name] = box ? [Math.floor(box.left), Math.ceil(box.right)] : null;
            }
            return {
                viewport: document.documentElement.clientWidth,
                page: document.documentElement.scrollWidth,
                list: [results.scrollWidth, results.clientWidth],
                shown: [Math.floor(shown.left), Math.ceil(shown.right)],
                rows: document.querySelectorAll("#result_list tbody tr").length,
                headers,
            };
        }""",
        columns,
    )


def assert_in_view(seen: dict) -> None:
    """No sideways scrolling of the page, and every header asked for in view."""
    assert seen["rows"] > 0, seen
    assert seen["page"] <= seen["viewport"], f"the page scrolls sideways: {seen}"
    left, right = max(0, seen["shown"][0]), min(seen["viewport"], seen["shown"][1])
    for name, box in seen["headers"].items():
        assert box is not None, f"no column {name}: {seen}"
        assert box[0] >= left, f"{name} is cut off on the left: {seen}"
        assert box[1] <= right, f"{name} is out of view: {seen}"


def make_the_data(folders, drop) -> tuple:
    """Schedules with long names, folders and many sizes; images that stretch every column."""
    User.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    deep = folders["root"] / DEEP
    deep.mkdir(parents=True)
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name=SCHEDULE,
        task="jobs.sweep_folder",
        interval=every_second,
        kwargs=json.dumps({"folder": str(deep), "sizes": SIZES, "quality": 70}),
    )
    crontab = CrontabSchedule.objects.create(minute="*/5", hour="1-5")
    PeriodicTask.objects.create(
        name="Nightly sweep of the scanner's drop folder (disabled while it is repaired)",
        task="jobs.sweep_folder",
        crontab=crontab,
        kwargs=json.dumps({"folder": str(folders["other"]), "sizes": SIZES[:3]}),
        enabled=False,
    )
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    for index, name in enumerate(LONG_NAMES):
        colour = (40 * index, 90, 200 - 30 * index)
        data = image_bytes(
            (1600 + 40 * index, 1000), "RGB", formats[name.rsplit(".", 1)[1]], colour
        )
        drop(deep, name, data)
    drop(deep, COPY, (deep / LONG_NAMES[0]).read_bytes())
    drop(deep, BROKEN, b"\xff\xd8\xff" * 50)
    return deep, crontab


def test_admin_lists_show_their_key_columns_at_1366_without_sideways_scrolling(
    system, folders, drop
):
    deep, crontab = make_the_data(folders, drop)
    system.worker()
    system.beat()
    base_url = start_web(system)
    wait_for(
        lambda: Image.objects.filter(folder=str(deep), in_folder=False).count() == 7,
        timeout=90,
        what="all seven images finished",
    )
    wait_for(
        lambda: TaskResult.objects.filter(periodic_task_name=SCHEDULE).exists(),
        what="a task result of the schedule",
    )
    assert Image.objects.filter(status=Image.Status.FAILED).count() == 1
    assert Image.objects.filter(status=Image.Status.DUPLICATE).count() == 1
    sweep = Sweep.objects.filter(schedule_name=SCHEDULE).exclude(claimed=0).first()
    assert sweep is not None

    with chromium_page(base_url, WIDTH, HEIGHT) as page:
        admin_login(page)
        for name, (url, key) in LISTS.items():
            page.goto(url)
            if name == "image":
                page.wait_for_function(
                    """() => Array.from(document.querySelectorAll("img.parroter-preview"))
                        .every((i) => i.complete && i.naturalWidth > 0)"""
                )
            # At this width the navigation sidebar starts closed: every column fits.
            assert not page.locator("#nav-sidebar").is_visible()
            seen = layout(page, key + EVERY_COLUMN[name])
            assert seen["list"][0] <= seen["list"][1], f"{name} list scrolls sideways: {seen}"
            assert_in_view(seen)
            screenshot(page, f"layout-{name}-list")

        # Opened, the sidebar takes 300 px: the key columns still show, first in each row.
        page.click("#toggle-nav-sidebar")
        for name, (url, key) in LISTS.items():
            page.goto(url)
            assert page.locator("#nav-sidebar").is_visible()
            assert_in_view(layout(page, key))
            screenshot(page, f"layout-{name}-list-with-sidebar")
        page.click("#toggle-nav-sidebar")

        # Paths wrap at "/" rather than running off the screen.
        page.goto("/admin/jobs/image/")
        assert "camera-a/<wbr>day-01/<wbr>morning/<wbr>IMG_" in page.inner_html("#result_list")

        # The sweep's page: its sizes as text.
        page.goto(f"/admin/jobs/sweep/{sweep.id}/change/")
        sizes = page.inner_text(".field-sizes_display .readonly").split(", ")
        assert sorted(sizes) == sorted(size.replace("x", "×") for size in SIZES)
        screenshot(page, "layout-sweep-detail")

        # A task result: its keyword arguments readable, not a Python repr.
        result = TaskResult.objects.filter(periodic_task_name=SCHEDULE).first()
        page.goto(f"/admin/django_celery_results/taskresult/{result.id}/change/")
        arguments = page.inner_text(".field-arguments_table")
        assert "quality\t70" in arguments
        assert "sizes\t32x32, 64x64, 96x96, 128x128, 160x120, 256x256, 320x240, 512x512" in (
            arguments
        )
        assert "{'folder'" not in page.inner_text("#content")
        screenshot(page, "layout-task-result-detail")

        image = Image.objects.get(name=LONG_NAMES[0])
        page.goto(f"/admin/jobs/image/{image.id}/change/")
        assert page.locator(".parroter-gallery img").count() == len(SIZES)
        screenshot(page, "layout-image-detail")

        # The crontab field of the periodic-task form says in words what is chosen, or nothing.
        page.goto("/admin/django_celery_beat/periodictask/add/")
        assert "undefined" not in page.inner_text(".field-crontab")
        assert page.locator("#crontab-words").is_hidden()
        page.select_option("#id_crontab", str(crontab.id))
        assert page.inner_text("#crontab-words") == f"In words: {crontab.human_readable}"
        page.select_option("#id_crontab", "")
        assert page.locator("#crontab-words").is_hidden()
        with page.expect_popup() as popup_opened:
            page.click("#add_id_crontab")
        popup = popup_opened.value
        popup.fill("#id_minute", "15")
        popup.fill("#id_hour", "3")
        popup.click("input[name=_save]")
        popup.wait_for_event("close")
        added = CrontabSchedule.objects.latest("id")
        assert page.input_value("#id_crontab") == str(added.id)
        page.wait_for_selector("#crontab-words:not([hidden])")
        assert page.inner_text("#crontab-words") == f"In words: {added.human_readable}"
        assert "undefined" not in page.inner_text(".field-crontab")
        screenshot(page, "layout-periodic-task-form")

        # The favicon, where browsers and tools ask for it.
        favicon = page.request.get("/favicon.ico")
        assert favicon.ok
        assert favicon.body()[:4] == b"\x00\x00\x01\x00"
        assert page.request.get("/static/jobs/favicon.svg").ok

        # The upload page writes sizes in the server's units.
        page.goto("/")
        page.set_input_files(
            "#id_images",
            files=[{"name": "up.jpg", "mimeType": "image/jpeg", "buffer": image_bytes()}],
        )
        page.fill("#id_sizes", "64x64")
        page.click("#upload-button")
        page.wait_for_selector("#upload-progress[data-over=true]", timeout=60_000)
        upload = Image.objects.get(name="up.jpg")
        detail = page.inner_text(".job[data-status=done] .detail")
        assert f"zip {filesizeformat(upload.archive_size)}" in detail
        assert not re.search(r"\bKiB\b", detail)
        screenshot(page, "layout-upload-done")

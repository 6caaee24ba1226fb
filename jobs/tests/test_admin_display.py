"""What the admin shows people: sizes, task arguments, times, units, filters and the favicon."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from uuid import uuid4

import pytest
from celery import states
from celery.app.task import Context
from celery.utils.saferepr import saferepr
from django.conf import settings
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django_celery_beat.models import CrontabSchedule
from django_celery_results.models import TaskResult

from jobs import runner
from jobs.admin.display import sizes_text, value_text, wrap_path
from jobs.admin.task_results import stored_arguments, stored_value
from jobs.models import Image, Sweep
from jobs.sweeper import run_sweep, start_sweep
from project.celery import app as celery_app

from .conftest import image_bytes

pytestmark = pytest.mark.django_db

# The one time format of the admin: seconds included.
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture
def processed(folders, drop) -> dict[str, Image]:
    drop(folders["watch"], "deep/er/photo.jpg", image_bytes((400, 300)))
    drop(folders["watch"], "broken.jpg", b"not an image")
    sweep, path, labels = start_sweep(
        str(folders["watch"]), ["64x64", "32x32"], trigger=Sweep.Trigger.MANUAL
    )
    outcome = run_sweep(sweep, path, labels)
    for image_id in outcome.to_queue:
        runner.process_image(image_id)
    return {image.name: image for image in Image.objects.all()}


def stored_task(task: str, args: tuple, kwargs: dict, result: object, **request: str) -> TaskResult:
    """A task result written by django-celery-results' own backend, as a worker writes it.

    Celery sends the arguments as reprs of at most 1,024 characters (argsrepr/kwargsrepr).
    """
    task_id = str(uuid4())
    context = Context(
        id=task_id,
        task=task,
        args=args,
        kwargs=kwargs,
        argsrepr=saferepr(args, 1024),
        kwargsrepr=saferepr(kwargs, 1024),
        hostname="worker@host",
        **request,
    )
    celery_app.backend.store_result(task_id, result, states.SUCCESS, request=context)
    return TaskResult.objects.get(task_id=task_id)


def test_wrap_path_breaks_after_each_slash_and_escapes_the_rest():
    assert wrap_path("/a/<b>/c.jpg") == "/<wbr>a/<wbr>&lt;b&gt;/<wbr>c.jpg"
    assert wrap_path("plain.jpg") == "plain.jpg"


def test_sizes_text_reads_as_sizes_with_multiplication_signs():
    assert sizes_text(["128x128", "256x256"]) == "128×128, 256×256"
    assert sizes_text("64x64 800x600") == "64×64, 800×600"
    assert sizes_text([]) == "—"


def test_sweep_page_shows_sizes_as_text_not_json(admin_client, folders):
    sweep = Sweep.objects.create(
        trigger=Sweep.Trigger.MANUAL,
        folder=str(folders["watch"]),
        sizes=["128x128", "256x256"],
        status=Sweep.Status.DONE,
    )
    page = admin_client.get(reverse("admin:jobs_sweep_change", args=[sweep.id])).content.decode()
    assert "128×128, 256×256" in page
    assert "[&quot;128x128&quot;" not in page
    assert '["128x128"' not in page


def test_sweep_list_merges_counts_and_names_who_sent_it(admin_client, folders):
    Sweep.objects.create(
        trigger=Sweep.Trigger.MANUAL,
        folder=str(folders["watch"]),
        status=Sweep.Status.DONE,
        seen=9,
        claimed=5,
        unstable=2,
        requeued=1,
    )
    page = admin_client.get(reverse("admin:jobs_sweep_changelist")).content.decode()
    assert "2 still changing" in page
    assert "1 redone" in page
    assert "ignored" not in page.split('id="result_list"')[1]  # a zero count is left out
    assert "sweep now / command" in page
    assert "/<wbr>watch" in page


def test_sweep_schedule_filter_has_no_unnamed_entry(admin_client, folders):
    Sweep.objects.create(trigger=Sweep.Trigger.MANUAL, folder="x", status=Sweep.Status.DONE)
    Sweep.objects.create(
        trigger=Sweep.Trigger.SCHEDULE, schedule_name="nightly", folder="x", status="done"
    )
    page = admin_client.get(reverse("admin:jobs_sweep_changelist")).content.decode()
    schedule_filter = page.split("By schedule")[1].split("</ul>")[0]
    assert "nightly" in schedule_filter
    assert not re.search(r">\s*\(\d+\)\s*<", schedule_filter)


def test_image_list_shows_name_facts_archive_link_and_finished_time_with_seconds(
    admin_client, processed
):
    photo = processed["deep/er/photo.jpg"]
    page = admin_client.get(reverse("admin:jobs_image_changelist")).content.decode()
    assert "deep/<wbr>er/<wbr>photo.jpg" in page
    assert f"400×300 · JPEG · {filesizeformat(photo.file_size)}" in page
    assert reverse("jobs:archive", args=[photo.id]) in page
    assert filesizeformat(photo.archive_size) in page
    assert re.search(rf"{TIME}<br><small[^>]*>took \d+\.\d\d s</small>", page)


def test_image_pages_use_one_unit_family_for_sizes(admin_client, processed):
    photo = processed["deep/er/photo.jpg"]
    page = admin_client.get(reverse("admin:jobs_image_change", args=[photo.id])).content.decode()
    assert filesizeformat(photo.archive_size) in page
    assert filesizeformat(photo.file_size) in page
    assert not re.search(r"\d (KiB|MiB|GiB)\b", page)


def test_upload_script_formats_sizes_like_the_server():
    script = (settings.BASE_DIR / "jobs/static/jobs/upload.js").read_text()
    assert "KiB" not in script
    assert '["KB", "MB", "GB", "TB", "PB"]' in script  # the units of filesizeformat


def test_image_format_filter_names_images_without_a_format(admin_client, processed):
    url = reverse("admin:jobs_image_changelist")
    page = admin_client.get(url).content.decode()
    format_filter = page.split("By format")[1].split("</ul>")[0]
    assert "none recorded" in format_filter
    assert "JPEG" in format_filter
    assert not re.search(r">\s*\(\d+\)\s*<", format_filter)
    unread = admin_client.get(url + "?format=none").content.decode()
    assert "broken.jpg" in unread
    assert "photo.jpg" not in unread


def test_image_page_wraps_paths_and_escapes_them(admin_client, folders, drop):
    drop(folders["watch"], "a<b>c&d/x.jpg", b"not an image")
    sweep, path, labels = start_sweep(str(folders["watch"]), ["8x8"], trigger="manual")
    for image_id in run_sweep(sweep, path, labels).to_queue:
        runner.process_image(image_id)
    image = Image.objects.get()
    page = admin_client.get(reverse("admin:jobs_image_change", args=[image.id])).content.decode()
    assert "a&lt;b&gt;c&amp;d/<wbr>x.jpg" in page
    assert "a<b>c" not in page


def test_task_result_pages_show_keyword_arguments_readably(admin_client):
    kwargs = {"folder": "/data/inbox/customers", "sizes": ["64x64", "800x600"], "quality": 70}
    result = stored_task(
        "jobs.sweep_folder",
        (),
        kwargs,
        {"sweep": 7, "status": "done"},
        periodic_task_name="nightly",
    )
    # What the library stores is JSON of Celery's Python repr: the raw form people saw.
    assert result.task_kwargs == json.dumps(repr(kwargs))

    listing = admin_client.get(reverse("admin:django_celery_results_taskresult_changelist"))
    text = listing.content.decode()
    assert "folder: /<wbr>data/<wbr>inbox/<wbr>customers" in text
    assert "sizes: 64x64, 800x600" in text
    assert "quality: 70" in text
    assert "{&#x27;folder&#x27;" not in text
    assert re.search(TIME, text)

    url = reverse("admin:django_celery_results_taskresult_change", args=[result.id])
    page = admin_client.get(url).content.decode()
    assert "<tr><th>folder</th><td>/<wbr>data/<wbr>inbox/<wbr>customers</td></tr>" in page
    assert "<tr><th>quality</th><td>70</td></tr>" in page
    assert "<tr><th>status</th><td>done</td></tr>" in page  # the result, too
    assert "{&#x27;folder&#x27;" not in page
    assert "&quot;()&quot;" not in page


def test_task_result_pages_show_positional_arguments_and_no_periodic_name(admin_client):
    stored_task("jobs.make_thumbnails", (42,), {}, "done")
    text = admin_client.get(
        reverse("admin:django_celery_results_taskresult_changelist")
    ).content.decode()
    assert "#1: 42" in text
    assert "none (sent otherwise)" in text
    assert not re.search(r">\s*-\s*</a>", text.split("By periodic task")[1].split("</ul>")[0])


def test_stored_value_keeps_a_shortened_repr_as_text():
    kwargs = {"folder": "/a/" + "b" * 2000, "sizes": ["1x1"] * 300}
    text = saferepr(kwargs, 1024)  # cut short by Celery, no longer a Python literal
    assert stored_arguments(json.dumps(text)) == text
    shown = value_text(stored_arguments(json.dumps(text)), limit=50)
    assert shown.startswith('<span title="{&#x27;folder&#x27;: &#x27;/a/bbb')
    assert shown.endswith("…</span>")
    assert value_text([1, 2, Ellipsis]) == "1, 2, …"
    assert stored_arguments("not json") == "not json"
    assert stored_arguments(json.dumps("__import__('os')")) == "__import__('os')"
    assert stored_value(json.dumps("(1, 2)")) == "(1, 2)"  # a result is JSON only


def test_periodic_task_form_shows_a_crontab_in_words_without_undefined(admin_client):
    crontab = CrontabSchedule.objects.create(minute="15", hour="3")
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_add")).content.decode()
    assert "Translation:" not in page
    assert "jobs/crontab.js" in page
    known = re.search(r'<script id="readable-crontabs" [^>]*>(.*?)</script>', page, re.S)
    assert json.loads(known.group(1)) == {str(crontab.id): crontab.human_readable}

    url = reverse("admin:jobs_crontab_words", args=[crontab.id])
    assert admin_client.get(url).json() == {"id": crontab.id, "words": "At 03:15 AM UTC"}
    assert (
        admin_client.get(reverse("admin:jobs_crontab_words", args=[crontab.id + 1])).status_code
        == 404
    )


def test_crontab_words_are_for_staff_only(client, django_user_model):
    crontab = CrontabSchedule.objects.create(minute="15", hour="3")
    client.force_login(django_user_model.objects.create_user("eve"))
    response = client.get(reverse("admin:jobs_crontab_words", args=[crontab.id]))
    assert response.status_code == 302
    assert "/admin/login/" in response.url


def test_favicon_is_served_and_linked_from_the_admin_and_the_site(admin_client, client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301
    icon = client.get(response.url)
    assert icon.status_code == 200
    # Read to the end: the test client then closes the file.
    assert b"".join(icon.streaming_content)[:4] == b"\x00\x00\x01\x00"  # an ICO file
    svg = client.get("/static/jobs/favicon.svg")
    assert svg.status_code == 200
    assert svg["Content-Type"].startswith("image/svg+xml")
    assert b"<svg" in b"".join(svg.streaming_content)
    for page in (admin_client.get(reverse("admin:index")), client.get(reverse("jobs:login"))):
        text = page.content.decode()
        assert '<link rel="icon" href="/static/jobs/favicon.svg" type="image/svg+xml">' in text
        assert '<link rel="icon" href="/static/jobs/favicon.ico"' in text


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_admin_modules_never_import_the_views():
    folder = settings.BASE_DIR / "jobs/admin"
    modules = {path.name: imported_modules(path, "jobs.admin") for path in folder.glob("*.py")}
    assert {"images.py", "sweeps.py", "display.py"} <= modules.keys()
    assert "jobs.archives.archive_holder" in modules["images.py"]  # relative imports resolved
    assert {name: found for name, found in modules.items() if "jobs.views" in found} == {}

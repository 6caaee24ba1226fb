"""Output presets from every entry point to the zip: sweep kwargs, settings, uploads,
reprocess; recorded on the sweep and each image, part of the duplicate key."""

from __future__ import annotations

import io
import zipfile

import pytest
from django.urls import reverse
from PIL import Image as PILImage

from jobs import runner, uploads
from jobs.models import Image, Sweep
from jobs.sweeper import SweepArgumentsError, resolve_options
from jobs.tasks import make_thumbnails, sweep_folder

from .conftest import image_bytes

pytestmark = pytest.mark.django_db


def members(folders, image: Image) -> list[str]:
    with zipfile.ZipFile(folders["media"] / image.archive) as archive:
        return archive.namelist()


def test_resolve_options_keeps_only_what_differs_from_the_pipeline_defaults():
    assert resolve_options({"format": "same", "fit": "contain", "metadata": "strip"}) == {}
    assert resolve_options({"format": "webp", "fit": "cover", "gravity": "attention"}) == {
        "format": "webp",
        "fit": "cover",
        "gravity": "attention",
    }
    assert resolve_options({"metadata": "keep", "gps": True, "colour": "keep"}) == {
        "metadata": "keep",
        "gps": True,
        "colour": "keep",
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"format": "gif"}, "format must be one of same, jpeg, webp, avif"),
        ({"fit": "stretch"}, "fit must be one of contain, cover"),
        ({"gps": True}, "needs metadata=keep"),
        ({"gps": "yes", "metadata": "keep"}, "gps must be true or false"),
    ],
)
def test_resolve_options_refuses_bad_presets(raw, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(raw)


def test_resolve_options_takes_the_settings_defaults_and_records_them(settings):
    settings.THUMBNAIL_FORMAT = "avif"
    settings.THUMBNAIL_FIT = "cover"
    assert resolve_options({}) == {"format": "avif", "fit": "cover"}
    # Asked for explicitly, the pipeline's own default wins over the settings'.
    assert resolve_options({"format": "same"}) == {"fit": "cover"}


def test_sweep_folder_with_a_preset_makes_webp_covers_and_records_it(folders, drop):
    drop(folders["watch"], "wide.jpg", image_bytes((800, 200)))
    result = sweep_folder(
        folder=str(folders["watch"]), sizes=["64x64", "100x50"], format="webp", fit="cover"
    )
    sweep = Sweep.objects.get(id=result["sweep"])
    assert sweep.options == {"format": "webp", "fit": "cover"}
    image = Image.objects.get()
    assert image.options == sweep.options
    assert "format=webp" in image.sizes_key
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert image.thumbnails == {"64x64": [64, 64], "100x50": [100, 50]}
    assert sorted(members(folders, image)) == ["wide.jpg", "wide_100x50.webp", "wide_64x64.webp"]
    assert image.notes == ""


def test_sweep_folder_refuses_a_bad_preset_with_a_recorded_reason(folders, drop):
    drop(folders["watch"], "photo.jpg")
    with pytest.raises(SweepArgumentsError, match="fit must be one of contain, cover"):
        sweep_folder(folder=str(folders["watch"]), sizes=["64x64"], fit="squash")
    assert Sweep.objects.get().status == Sweep.Status.FAILED
    assert not Image.objects.exists()


def test_the_same_content_with_another_preset_is_no_duplicate(folders, drop):
    data = image_bytes((400, 300))
    made = []
    for name, preset in (("a.jpg", {}), ("b.jpg", {"fit": "cover"}), ("c.jpg", {})):
        drop(folders["watch"], name, data)
        sweep_folder(folder=str(folders["watch"]), sizes=["64x64"], **preset)
        image = Image.objects.get(name=name)
        made.append(make_thumbnails(image.id))
    assert made == [Image.Status.DONE, Image.Status.DONE, Image.Status.DUPLICATE]
    assert Image.objects.get(name="c.jpg").duplicate_of == Image.objects.get(name="a.jpg")
    assert Image.objects.get(name="b.jpg").thumbnails == {"64x64": [64, 64]}


def test_claim_again_applies_a_new_preset_and_keeps_the_quality(
    folders, drop, django_capture_on_commit_callbacks
):
    drop(folders["watch"], "photo.jpg", image_bytes((400, 300)))
    sweep_folder(folder=str(folders["watch"]), sizes=["64x64"], quality=70)
    image = Image.objects.get()
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    result = uploads.claim_again([image], None, {"format": "avif", "fit": "cover"})
    assert result.queued == [image.id]
    image.refresh_from_db()
    assert image.options == {"quality": 70, "format": "avif", "fit": "cover"}
    assert image.sizes_key == Image.sizes_key_for(["64x64"], image.options)
    with django_capture_on_commit_callbacks(execute=True):
        assert runner.process_image(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert members(folders, image) == ["photo.jpg", "photo_64x64.avif"]


def test_admin_reprocess_form_applies_a_preset_only_when_ticked(
    admin_client, folders, drop, django_capture_on_commit_callbacks
):
    drop(folders["watch"], "photo.jpg", image_bytes((400, 300)))
    sweep_folder(folder=str(folders["watch"]), sizes=["64x64"])
    image = Image.objects.get()
    make_thumbnails(image.id)
    url = reverse("admin:jobs_image_reprocess")
    page = admin_client.get(url + f"?ids={image.id}").content.decode()
    assert 'name="format"' in page
    assert 'name="change_preset"' in page
    # Not ticked: the preset fields are ignored, the image keeps its options.
    admin_client.post(url, {"ids": str(image.id), "sizes": "64x64", "format": "webp"})
    image.refresh_from_db()
    assert image.options == {}
    with django_capture_on_commit_callbacks(execute=True):
        runner.process_image(image.id)
    response = admin_client.post(
        url,
        {"ids": str(image.id), "sizes": "64x64", "change_preset": "on", "format": "webp"},
    )
    assert response.status_code == 302
    image.refresh_from_db()
    assert image.options == {"format": "webp"}
    with django_capture_on_commit_callbacks(execute=True):
        assert runner.process_image(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert members(folders, image) == ["photo.jpg", "photo_64x48.webp"]
    page = admin_client.get(reverse("admin:jobs_image_change", args=[image.id])).content
    assert b"format webp" in page


def test_upload_with_a_preset_is_recorded_and_made(client, folders, django_user_model):
    client.force_login(django_user_model.objects.create_user("alice"))
    handle = io.BytesIO(image_bytes((400, 300)))
    handle.name = "up.jpg"
    response = client.post(
        reverse("jobs:upload"),
        {"images": [handle], "sizes": "50x50", "fit": "cover", "metadata": "keep"},
    )
    assert response.status_code == 201, response.content
    image = Image.objects.get()
    assert image.options == image.sweep.options == {"fit": "cover", "metadata": "keep"}
    assert runner.process_image(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert image.thumbnails == {"50x50": [50, 50]}


def test_upload_refuses_gps_without_kept_metadata(client, folders, django_user_model):
    client.force_login(django_user_model.objects.create_user("alice"))
    handle = io.BytesIO(image_bytes((40, 30)))
    handle.name = "up.jpg"
    response = client.post(reverse("jobs:upload"), {"images": [handle], "gps": "on"})
    assert response.status_code == 400
    assert "needs metadata=keep" in response.content.decode()
    assert not Image.objects.exists()


def test_a_heic_drop_becomes_jpeg_thumbnails(folders, drop):
    buffer = io.BytesIO()
    PILImage.new("RGB", (300, 200), (20, 120, 220)).save(buffer, "HEIF", quality=90)
    drop(folders["watch"], "IMG_0001.HEIC", buffer.getvalue())
    sweep_folder(folder=str(folders["watch"]), sizes=["64x64"])
    image = Image.objects.get()
    assert make_thumbnails(image.id) == Image.Status.DONE
    image.refresh_from_db()
    assert (image.format, image.width, image.height) == ("HEIF", 300, 200)
    assert members(folders, image) == ["IMG_0001.heic", "IMG_0001_64x43.jpg"]

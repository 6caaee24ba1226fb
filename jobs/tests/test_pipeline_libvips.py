"""The libvips WebP decoder behind write_archive(libvips=True): same archive, same pixels
within a few levels, Pillow's checks still first. Pure pipeline: no Django, no database."""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace

import pytest
from PIL import Image, ImageChops, ImageStat

from jobs import pipeline
from jobs.pipeline import ImageRejected, Limits, parse_sizes, write_archive

pytest.importorskip("pyvips")

SIZES = parse_sizes("128x128,256x256,512x512")


def webp(size: tuple[int, int], mode: str = "RGB", **params: object) -> bytes:
    """Smooth gradients, so that two good resamplers agree to within a level or two."""
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    image = Image.merge("RGB", (red, green, red.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    if mode == "RGBA":
        image.putalpha(
            Image.linear_gradient("L").resize(size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        )
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=95, **params)
    return buffer.getvalue()


def archive(data: bytes, libvips: bool, **kwargs) -> tuple[pipeline.ArchiveInfo, dict]:
    out = io.BytesIO()
    info = write_archive(data, "wall.webp", out, SIZES, libvips=libvips, **kwargs)
    with zipfile.ZipFile(out) as zipped:
        members = {name: zipped.read(name) for name in zipped.namelist()}
    return info, members


def test_write_archive_libvips_webp_matches_pillow_archive():
    data = webp((2400, 1600))
    pillow_info, pillow_members = archive(data, libvips=False)
    vips_info, vips_members = archive(data, libvips=True)
    # The same archive but for its size: the thumbnails' pixels differ by a level or two.
    assert replace(vips_info, archive_bytes=0) == replace(pillow_info, archive_bytes=0)
    assert list(vips_members) == list(pillow_members)
    assert vips_members["wall.webp"] == data
    for name in list(pillow_members)[1:]:
        ours = Image.open(io.BytesIO(vips_members[name])).convert("RGB")
        theirs = Image.open(io.BytesIO(pillow_members[name])).convert("RGB")
        assert ours.size == theirs.size
        difference = sum(ImageStat.Stat(ImageChops.difference(ours, theirs)).mean) / 3
        assert difference < 2.0, (name, difference)


def test_write_archive_libvips_webp_keeps_alpha():
    _, members = archive(webp((2000, 1500), "RGBA"), libvips=True)
    # Members are named after their real size.
    thumbnail = Image.open(io.BytesIO(members["wall_512x384.webp"]))
    assert thumbnail.mode == "RGBA"
    assert thumbnail.size == (512, 384)
    assert thumbnail.getextrema()[3][0] < 32  # the gradient's transparent end survived


def test_write_archive_libvips_webp_turns_by_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    info, members = archive(webp((2000, 1000), exif=exif.tobytes()), libvips=True)
    assert (info.width, info.height) == (1000, 2000)
    assert Image.open(io.BytesIO(members["wall_256x512.webp"])).size == (256, 512)


def test_write_archive_libvips_leaves_small_webp_to_pillow():
    data = webp((600, 400))
    image = pipeline.open_image(data)
    assert pipeline._libvips_scale(image, SIZES) == 1.0
    assert archive(data, libvips=True) == archive(data, libvips=False)


def test_write_archive_libvips_truncated_webp_is_rejected():
    data = webp((2400, 1600))
    with pytest.raises(ImageRejected):
        archive(data[: len(data) // 2], libvips=True)


def test_write_archive_libvips_checks_limits_before_decoding():
    data = webp((2400, 1600))
    with pytest.raises(ImageRejected, match="pixel limit"):
        archive(data, libvips=True, limits=Limits(max_pixels=1_000_000))
    with pytest.raises(ImageRejected, match="memory budget"):
        archive(data, libvips=True, limits=Limits(memory_bytes=16 * pipeline.MiB))

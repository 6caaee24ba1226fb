"""Properties of the pipeline over many generated inputs, and a fuzz pass over broken ones.

Kept small enough (max_examples) to run in seconds; raise the numbers locally to dig.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from jobs import pipeline
from jobs.pipeline import ImageRejected, Limits, ThumbnailSize, safe_stem, write_archive

# Which file formats can carry which modes, for the generator.
FORMATS_FOR_MODE = {
    "RGB": ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"),
    "L": ("JPEG", "PNG", "TIFF", "BMP"),
    "CMYK": ("JPEG", "TIFF"),
    "RGBA": ("PNG", "WEBP", "TIFF"),
    "LA": ("PNG",),
    "P": ("PNG", "GIF", "BMP"),
    "1": ("PNG", "TIFF", "BMP"),
    "I;16": ("PNG", "TIFF"),
}
SETTINGS = settings(
    max_examples=80,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """A picture with some structure (a gradient and a block), in the given mode."""
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge(
        "RGB",
        (
            gradient,
            gradient.transpose(Image.Transpose.ROTATE_90).resize((width, height)),
            Image.new("L", (width, height), seed),
        ),
    )
    image.paste((seed, 255 - seed, 128), (0, 0, max(1, width // 3), max(1, height // 3)))
    if mode == "I;16":
        return image.convert("L").convert("I").point(lambda value: value * 257).convert("I;16")
    if mode == "RGBA":
        image.putalpha(gradient)
        return image
    if mode == "LA":
        return Image.merge("LA", (image.convert("L"), gradient))
    return image.convert(mode)


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


image_specs = st.sampled_from(sorted(FORMATS_FOR_MODE)).flatmap(
    lambda mode: st.tuples(
        st.just(mode),
        st.sampled_from(FORMATS_FOR_MODE[mode]),
        st.integers(1, 400),
        st.integers(1, 400),
        st.integers(0, 255),
    )
)
boxes = st.lists(
    st.builds(ThumbnailSize, st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=4
)


@SETTINGS
@given(spec=image_specs, sizes=boxes)
@example(spec=("RGB", "JPEG", 400, 1, 0), sizes=[ThumbnailSize(1, 1)])
@example(spec=("I;16", "PNG", 1, 400, 0), sizes=[ThumbnailSize(300, 7)])
def test_write_archive_fits_every_thumbnail_within_one_pixel(spec, sizes):
    mode, image_format, width, height, seed = spec
    data = encoded(make_image(mode, width, height, seed), image_format)
    with tempfile.TemporaryDirectory() as folder:
        destination = Path(folder) / "a.zip"
        with destination.open("wb") as out:
            info = write_archive(data, f"in.{image_format}", out, sizes)
        assert (info.width, info.height) == (width, height)
        with zipfile.ZipFile(destination) as archive:
            assert archive.testzip() is None
            assert archive.read(info.members[0]) == data
            # One member per size made, named after that size.
            assert len(archive.namelist()) == 1 + len(set(info.thumbnails.values()))
            names = {n.rsplit("_", 1)[1].split(".")[0]: n for n in archive.namelist()[1:]}
            for label, made in info.thumbnails.items():
                box = ThumbnailSize.parse(label)
                thumb = Image.open(io.BytesIO(archive.read(names[f"{made[0]}x{made[1]}"])))
                scale = min(box.width / width, box.height / height, 1)
                assert abs(thumb.width - width * scale) <= 1
                assert abs(thumb.height - height * scale) <= 1
                assert 1 <= thumb.width <= min(width, box.width)
                assert 1 <= thumb.height <= min(height, box.height)
                assert info.thumbnails[label] == thumb.size
        assert [path.name for path in Path(folder).iterdir()] == ["a.zip"]


names = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["..", ".", "", "a", "é", "写", " ", "\\", "😀", ".jpg"])).map(
        "/".join
    ),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=90, max_size=400),
)


@settings(max_examples=300, deadline=None, database=None)
@given(name=names)
@example(name="../../x.jpg")
@example(name="." * 300)
@example(name="CON")
def test_safe_stem_is_always_a_safe_short_name(name):
    stem = safe_stem(name)
    assert stem
    assert len(stem) <= pipeline.MAX_STEM_LENGTH
    assert len(stem.encode()) <= pipeline.MAX_STEM_BYTES
    assert not stem.startswith(".")
    assert not any(character in stem for character in '/\\\x00:*?"<>|')
    assert stem == stem.strip()
    # A stem given back an extension names the same thing.
    assert safe_stem(stem + ".jpg") == stem


def seed_files() -> list[bytes]:
    picture = make_image("RGB", 40, 30, 99)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [encoded(picture, image_format) for image_format in ("PNG", "GIF", "TIFF", "BMP")]
    for image_format in ("JPEG", "WEBP"):
        buffer = io.BytesIO()
        picture.save(buffer, image_format, exif=exif.tobytes())
        seeds.append(buffer.getvalue())
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", progressive=True)
    seeds.append(buffer.getvalue())
    seeds.append(encoded(make_image("I;16", 40, 30, 3), "PNG"))
    seeds.append(encoded(make_image("P", 40, 30, 3), "PNG"))
    return seeds


SEEDS = seed_files()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[max(1, position) :]
        if not data:
            break
    return bytes(data)


# Pillow warns (rather than fails) about some damage, such as a broken EXIF block; in
# production a warning is only logged, so here it must not become an error either.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=1000, deadline=None, database=None)
@given(data=st.one_of(st.binary(max_size=2000), mutated_images()))
@example(data=b"\xff\xd8\xff")
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=b"GIF89a")
def test_write_archive_fuzz_raises_nothing_but_image_rejected(data):
    out = io.BytesIO()
    rejected: ImageRejected | None = None
    try:
        info = write_archive(
            data,
            "fuzz.jpg",
            out,
            pipeline.parse_sizes("16x16,48x48"),
            limits=Limits(max_pixels=4_000_000),
        )
    except ImageRejected as exc:
        rejected = exc
    if rejected is not None:
        assert str(rejected), "a rejection says why"
        assert out.tell() == 0, "nothing is written for a rejected image"
        return
    assert info.archive_bytes == len(out.getvalue())
    with zipfile.ZipFile(out) as archive:
        assert archive.read(info.members[0]) == data

"""The libvips WebP and PNG decoders behind write_archive(libvips=True): same archive, same
pixels within a few levels, Pillow's checks still first. Pure pipeline: no Django, no
database."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import replace

import pytest
from PIL import Image, ImageChops, ImageStat

from jobs import pipeline
from jobs.pipeline import EncodeOptions, ImageRejected, Limits, parse_sizes, write_archive

pytest.importorskip("pyvips")

SIZES = parse_sizes("128x128,256x256,512x512")


def gradients(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth gradients, so that two good resamplers agree to within a level or two."""
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    image = Image.merge("RGB", (red, green, red.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    if mode == "RGBA":
        image.putalpha(
            Image.linear_gradient("L").resize(size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        )
    return image


def webp(size: tuple[int, int], mode: str = "RGB", **params: object) -> bytes:
    buffer = io.BytesIO()
    gradients(size, mode).save(buffer, "WEBP", quality=95, **params)
    return buffer.getvalue()


def png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def archive(
    data: bytes, libvips: bool, name: str = "wall.webp", **kwargs
) -> tuple[pipeline.ArchiveInfo, dict]:
    out = io.BytesIO()
    info = write_archive(data, name, out, SIZES, libvips=libvips, **kwargs)
    with zipfile.ZipFile(out) as zipped:
        members = {name: zipped.read(name) for name in zipped.namelist()}
    return info, members


def assert_same_archive(data: bytes, name: str, mode: str = "RGB") -> None:
    pillow_info, pillow_members = archive(data, libvips=False, name=name)
    vips_info, vips_members = archive(data, libvips=True, name=name)
    # The same archive but for its size: the thumbnails' pixels differ by a level or two.
    assert replace(vips_info, archive_bytes=0) == replace(pillow_info, archive_bytes=0)
    assert list(vips_members) == list(pillow_members)
    assert vips_members[name] == data
    for member in list(pillow_members)[1:]:
        ours = Image.open(io.BytesIO(vips_members[member]))
        theirs = Image.open(io.BytesIO(pillow_members[member]))
        assert ours.mode == theirs.mode == mode
        assert ours.size == theirs.size
        difference = ImageChops.difference(on_white(ours), on_white(theirs))
        mean = sum(ImageStat.Stat(difference).mean) / 3
        assert mean < 2.0, (member, mean)


def on_white(image: Image.Image) -> Image.Image:
    """As a viewer shows it: alpha laid on white."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def test_write_archive_libvips_webp_matches_pillow_archive():
    assert_same_archive(webp((2400, 1600)), "wall.webp")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_write_archive_libvips_png_matches_pillow_archive(mode):
    assert_same_archive(png(gradients((2400, 1600), "RGBA").convert(mode)), "wall.png", mode)


def test_write_archive_libvips_png_premultiplies_alpha():
    # Opaque white stripes on a transparent red background: unpremultiplied, the red would
    # bleed into the white where the two are averaged.
    image = Image.new("RGBA", (2400, 1600), (255, 0, 0, 0))
    for left in range(0, 2400, 8):
        image.paste((255, 255, 255, 255), (left, 0, left + 4, 1600))
    _, members = archive(png(image), libvips=True, name="wall.png")
    thumbnail = Image.open(io.BytesIO(members["wall_512x341.png"]))
    assert thumbnail.mode == "RGBA"
    assert 64 < thumbnail.getextrema()[3][1] < 255  # half covered: stripes averaged
    # On white it is white: no red came through with the transparent pixels.
    _, green, blue = on_white(thumbnail).getextrema()
    assert green[0] >= 250
    assert blue[0] >= 250


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


def test_write_archive_libvips_leaves_decoding_an_image_within_the_first_box_to_pillow():
    data = webp((500, 400))
    image = pipeline.open_image(data)
    assert pipeline._libvips_target(image, data, SIZES, EncodeOptions()) is None
    # Pillow decodes it; its resizes may still run in libvips (_resize).
    assert_same_archive(data, "wall.webp")


@pytest.mark.parametrize(
    "image",
    [
        Image.new("I;16", (2400, 1600), 3000),
        Image.new("P", (2400, 1600), 3),
        Image.new("RGB", (2400, 1600), (1, 2, 3)),
    ],
    ids=["16-bit", "palette", "tRNS"],
)
def test_write_archive_libvips_leaves_other_pngs_to_pillow(image):
    params = {"transparency": (1, 2, 3)} if image.mode == "RGB" else {}
    data = png(image, **params)
    opened = pipeline.open_image(data)
    assert pipeline._libvips_target(opened, data, SIZES, EncodeOptions()) is None
    assert archive(data, libvips=True, name="x.png") == archive(data, libvips=False, name="x.png")


def test_write_archive_libvips_48_bit_png_falls_back_to_pillow():
    pyvips = pytest.importorskip("pyvips")
    eight = pyvips.Image.new_from_buffer(png(gradients((2400, 1600))), "")
    data = (eight.cast("ushort") * 257).cast("ushort").copy(interpretation="rgb16")
    data = data.pngsave_buffer()
    # Pillow opens it as 8-bit RGB, libvips as 16 bits a sample: Pillow decodes it.
    opened = pipeline.open_image(data)
    assert opened.mode == "RGB"
    planned = pipeline._libvips_target(opened, data, SIZES, EncodeOptions())
    assert planned is not None
    assert pipeline._load_libvips(opened, data, planned[0]) is None
    assert_same_archive(data, "x.png")


def test_write_archive_libvips_png_orientation_after_the_pixels_is_pillows():
    exif = Image.Exif()
    exif[0x0112] = 6
    # Pillow writes eXIf before the pixels; move it after them, as some writers do.
    data = png(gradients((2000, 1000)), exif=exif.tobytes())
    start = data.index(b"eXIf") - 4
    length = int.from_bytes(data[start : start + 4], "big") + 12
    chunk = data[start : start + length]
    data = data[:start] + data[start + length : -12] + chunk + data[-12:]
    opened = pipeline.open_image(data)
    assert "exif" not in opened.info
    assert pipeline._libvips_target(opened, data, SIZES, EncodeOptions()) is None
    info, members = archive(data, libvips=True, name="wall.png")
    assert (info.width, info.height) == (1000, 2000)
    assert Image.open(io.BytesIO(members["wall_256x512.png"])).size == (256, 512)


def test_write_archive_libvips_png_turns_by_exif_before_the_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png(gradients((2000, 1000)), exif=exif.tobytes())
    opened = pipeline.open_image(data)
    # Upright 1000x2000, so 256x512 in a 512 box: 512x256 as stored.
    assert pipeline._libvips_target(opened, data, SIZES, EncodeOptions()) == ((512, 256), 6)
    info, members = archive(data, libvips=True, name="wall.png")
    assert (info.width, info.height) == (1000, 2000)
    assert Image.open(io.BytesIO(members["wall_256x512.png"])).size == (256, 512)


@pytest.mark.parametrize("make", [webp, lambda size: png(gradients(size))], ids=["webp", "png"])
def test_write_archive_libvips_cover_decodes_enough_to_cover_the_box(make):
    # 4:1: a 512 px box covered takes the image at 2048x512, where contain takes 512x128.
    data = make((4000, 1000))
    options = EncodeOptions(fit="cover")
    opened = pipeline.open_image(data)
    assert pipeline._libvips_target(opened, data, SIZES, options) == ((2048, 512), 1)
    pillow_info, _ = archive(data, libvips=False, options=options)
    vips_info, _ = archive(data, libvips=True, options=options)
    assert (
        vips_info.thumbnails
        == pillow_info.thumbnails
        == {
            "512x512": (512, 512),
            "256x256": (256, 256),
            "128x128": (128, 128),
        }
    )


@pytest.mark.parametrize("make", [webp, lambda size: png(gradients(size))], ids=["webp", "png"])
def test_write_archive_libvips_truncated_image_is_rejected(make):
    data = make((2400, 1600))
    with pytest.raises(ImageRejected):
        archive(data[: len(data) // 2], libvips=True)


def test_write_archive_libvips_checks_limits_before_decoding():
    data = webp((2400, 1600))
    with pytest.raises(ImageRejected, match="pixel limit"):
        archive(data, libvips=True, limits=Limits(max_pixels=1_000_000))
    with pytest.raises(ImageRejected, match="memory budget"):
        archive(data, libvips=True, limits=Limits(memory_bytes=16 * pipeline.MiB))


# --- libvips' resizes of what Pillow decoded ------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_resize_with_libvips_matches_pillows_lanczos(mode):
    source = gradients((960, 600), "RGBA").convert(mode)
    source.info["icc_profile"] = b"kept"
    ours = pipeline._resize(source, (512, 320), libvips=True)
    theirs = pipeline._resize(source, (512, 320), libvips=False)
    assert (ours.mode, ours.size, ours.info) == (theirs.mode, theirs.size, theirs.info)
    # As a viewer shows it, alpha laid on white (where alpha is near 0, the colour is not
    # seen and 8-bit premultiplied alpha keeps little of it).
    difference = ImageStat.Stat(ImageChops.difference(on_white(ours), on_white(theirs)))
    assert max(difference.mean) < 0.1
    # Not Pillow's resize under another name: the two differ somewhere.
    assert ours.tobytes() != theirs.tobytes()


def test_resize_with_libvips_premultiplies_alpha():
    # Transparent red between opaque white stripes: unpremultiplied, red would bleed in.
    source = Image.new("RGBA", (1200, 800), (255, 0, 0, 0))
    for left in range(0, 1200, 8):
        source.paste((255, 255, 255, 255), (left, 0, left + 4, 800))
    resized = pipeline._resize(source, (256, 170), libvips=True)
    assert 64 < resized.getextrema()[3][1] < 255  # stripes averaged
    _, green, blue = on_white(resized).getextrema()
    assert green[0] >= 250
    assert blue[0] >= 250


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (300, 200)), ("RGB", (4000, 3000)), ("CMYK", (960, 600)), ("I;16", (960, 600))],
    ids=["small", "large", "CMYK", "16-bit"],
)
def test_resize_leaves_to_pillow_what_libvips_would_not_win_or_keep(mode, size):
    source = Image.linear_gradient("L").resize(size).convert(mode)
    target = (size[0] // 3, size[1] // 3)
    assert (
        pipeline._resize(source, target, libvips=True).tobytes()
        == source.resize(
            target, Image.Resampling.LANCZOS, reducing_gap=pipeline.REDUCING_GAP
        ).tobytes()
    )


def test_write_archive_libvips_resizes_a_jpeg_draft_as_pillow_would():
    source = gradients((3840, 2400))
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", quality=95)
    assert_same_archive(buffer.getvalue(), "wall.jpg")


def artist_exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x013B] = "A. Photographer"
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (webp((2400, 1600), exif=artist_exif()), "wall.webp"),
        (png(gradients((2400, 1600)), exif=artist_exif()), "wall.png"),
    ],
    ids=["webp", "png"],
)
def test_write_archive_libvips_keeps_metadata_when_asked(data, name):
    options = EncodeOptions(metadata="keep")
    assert pipeline._libvips_target(pipeline.open_image(data), data, SIZES, options) is not None
    _, members = archive(data, libvips=True, name=name, options=options)
    for member in list(members)[1:]:
        assert Image.open(io.BytesIO(members[member])).getexif()[0x013B] == "A. Photographer"


def test_write_archive_libvips_looks_for_kept_metadata_without_decoding_a_png(monkeypatch):
    # Pillow's getexif decodes a PNG that has no EXIF before its pixels, to look after them:
    # the whole image, which libvips is there to decode at a fraction of the memory.
    from PIL import PngImagePlugin

    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(
        PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self.size) or load(self)
    )
    data = png(gradients((2400, 1600)))
    _, members = archive(
        data, libvips=True, name="wall.png", options=EncodeOptions(metadata="keep")
    )
    assert (2400, 1600) not in decoded
    assert len(Image.open(io.BytesIO(members["wall_512x341.png"])).getexif()) == 0


def raw_exif_profile(exif: bytes) -> str:
    """EXIF as ImageMagick writes it into a PNG's text: "Raw profile type exif", in hex."""
    digits = exif.hex()
    lines = "\n".join(digits[start : start + 72] for start in range(0, len(digits), 72))
    return f"\nexif\n{len(exif):8d}\n{lines}\n"


def xmp_orientation(orientation: int) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        f'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
        "</rdf:RDF></x:xmpmeta>"
    )


def chunk_after_pixels(data: bytes, kind: bytes, body: bytes) -> bytes:
    """A PNG with one more chunk, between its pixels and its end."""
    chunk = struct.pack(">I", len(body)) + kind + body
    chunk += struct.pack(">I", zlib.crc32(kind + body))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


@pytest.mark.parametrize(
    ("keyword", "text", "compressed", "after_pixels"),
    [
        ("XML:com.adobe.xmp", xmp_orientation(6), False, False),
        ("XML:com.adobe.xmp", xmp_orientation(6), True, False),
        ("Raw profile type exif", raw_exif_profile(artist_exif(orientation=6)), True, False),
        ("XML:com.adobe.xmp", xmp_orientation(6), True, True),
        ("Raw profile type exif", raw_exif_profile(artist_exif(orientation=6)), False, True),
    ],
    ids=[
        "xmp",
        "compressed-xmp",
        "imagemagick-raw-exif",
        "compressed-xmp-after-pixels",
        "raw-exif-text-after-pixels",
    ],
)
def test_write_archive_libvips_png_turns_by_orientation_outside_exif_as_pillow(
    keyword, text, compressed, after_pixels
):
    # Pillow reads a PNG's orientation from XMP and ImageMagick's raw EXIF profile too, not
    # only from an eXIf chunk, and wherever they are: libvips' thumbnails must come out the
    # same way up.
    from PIL import PngImagePlugin

    metadata = PngImagePlugin.PngInfo()
    if after_pixels:
        data = png(gradients((2000, 1000)))
        if compressed:  # iTXt: keyword, compressed, method, no language or translation
            body = keyword.encode() + b"\0\1\0\0\0" + zlib.compress(text.encode())
            data = chunk_after_pixels(data, b"iTXt", body)
        else:
            data = chunk_after_pixels(data, b"tEXt", keyword.encode() + b"\0" + text.encode())
    else:
        metadata.add_itxt(keyword, text, zip=compressed)
        data = png(gradients((2000, 1000)), pnginfo=metadata)
    pillow_info, pillow_members = archive(data, libvips=False, name="wall.png")
    vips_info, vips_members = archive(data, libvips=True, name="wall.png")
    assert (pillow_info.width, pillow_info.height) == (1000, 2000)
    assert (vips_info.width, vips_info.height) == (1000, 2000)
    assert list(vips_members) == list(pillow_members)
    assert Image.open(io.BytesIO(vips_members["wall_256x512.png"])).size == (256, 512)


XMP_ORIENTATION_ELEMENT = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"><tiff:Orientation>1</tiff:Orientation>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


@pytest.mark.parametrize(
    ("keyword", "text"),
    [
        # As image editors write it into many PNGs (4 of the mixed corpus's 41).
        ("XML:com.adobe.xmp", XMP_ORIENTATION_ELEMENT),
        ("XML:com.adobe.xmp", xmp_orientation(1)),
        ("Raw profile type exif", raw_exif_profile(artist_exif(orientation=1))),
    ],
    ids=["xmp-element", "xmp-attribute", "imagemagick-raw-exif"],
)
def test_write_archive_libvips_keeps_the_pngs_that_say_they_are_upright(keyword, text):
    from PIL import PngImagePlugin

    metadata = PngImagePlugin.PngInfo()
    metadata.add_itxt(keyword, text, zip=True)
    data = png(gradients((2400, 1600)), pnginfo=metadata)
    target = pipeline._libvips_target(pipeline.open_image(data), data, SIZES, EncodeOptions())
    assert target is not None
    assert target[1] == 1

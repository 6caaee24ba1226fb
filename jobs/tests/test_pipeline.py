"""Pixel-level tests of the pure image pipeline: no Django, no database, no files on disk
but the archives themselves. Every odd input is generated here, in code."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageCms

from jobs import pipeline, storage
from jobs.pipeline import (
    EncodeOptions,
    ImageRejected,
    Limits,
    ThumbnailSize,
    open_image,
    parse_sizes,
    safe_stem,
    write_archive,
)

SIZES = parse_sizes("128x128,256x256,512x512")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def quadrants(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Red top left, green top right, blue bottom left, white bottom right."""
    image = Image.new("RGB", (width, height), WHITE)
    image.paste(RED, (0, 0, width // 2, height // 2))
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    return image.convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixels at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"x")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build(tmp_path: Path, data: bytes, name: str = "photo.jpg", sizes=SIZES, **kwargs):
    destination = tmp_path / "out" / "archive.zip"
    with storage.atomic_file(destination) as out:
        info = write_archive(data, name, out, sizes, **kwargs)
    return info, destination


def thumbnails_of(destination: Path) -> dict[str, Image.Image]:
    """Every thumbnail in the archive, decoded, by member name (the original left out)."""
    with zipfile.ZipFile(destination) as archive:
        names = archive.namelist()[1:]
        images = {}
        for name in names:
            image = Image.open(io.BytesIO(archive.read(name)))
            image.load()
            images[name] = image
        return images


def close_to(actual, expected, tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def assert_no_temporary_files(folder: Path) -> None:
    if folder.exists():
        assert [path.name for path in folder.iterdir() if path.name.endswith(".part")] == []


# --- sizes ------------------------------------------------------------------------------


def test_thumbnail_size_label_is_width_x_height():
    assert ThumbnailSize(128, 64).label == "128x64"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("128x128", (128, 128)), (" 64 X 32 ", (64, 32)), ("10×20", (10, 20))],
)
def test_thumbnail_size_parse_accepts_common_spellings(text, expected):
    assert ThumbnailSize.parse(text) == ThumbnailSize(*expected)


@pytest.mark.parametrize("text", ["abc", "128", "0x10", "10x0", "-1x5", "10001x10", "1.5x2", ""])
def test_thumbnail_size_parse_rejects_nonsense_with_the_text_in_the_message(text):
    with pytest.raises(ValueError, match=repr(text).replace("(", r"\(").replace(")", r"\)")):
        ThumbnailSize.parse(text)


@pytest.mark.parametrize(
    ("box", "source", "expected"),
    [
        ((128, 128), (1000, 500), (128, 64)),
        ((128, 128), (500, 1000), (64, 128)),
        ((128, 128), (50, 40), (50, 40)),
        ((128, 128), (10000, 1), (128, 1)),
        ((100, 50), (1000, 333), (100, 33)),
    ],
)
def test_thumbnail_size_fit_keeps_aspect_and_never_upscales(box, source, expected):
    assert ThumbnailSize(*box).fit(*source) == expected


def test_parse_sizes_dedupes_and_sorts_largest_first():
    assert parse_sizes("128x128, 512x512,,128x128,256x256") == (
        ThumbnailSize(512, 512),
        ThumbnailSize(256, 256),
        ThumbnailSize(128, 128),
    )


def test_parse_sizes_accepts_a_list():
    assert parse_sizes(["64x64", "32x16"]) == (ThumbnailSize(64, 64), ThumbnailSize(32, 16))


def test_parse_sizes_names_the_bad_entry():
    with pytest.raises(ValueError, match="'huge' is not a size like 128x128"):
        parse_sizes("128x128,huge")


def test_parse_sizes_refuses_too_many():
    with pytest.raises(ValueError, match=f"at most {pipeline.MAX_SIZES} sizes"):
        parse_sizes([f"{n}x{n}" for n in range(1, pipeline.MAX_SIZES + 2)])


def test_parse_sizes_refuses_a_non_list():
    with pytest.raises(ValueError, match="must be a list"):
        parse_sizes(128)  # type: ignore[arg-type]


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("holiday.jpg", "holiday"),
        ("../../x.jpg", "x"),
        ("..\\..\\windows\\evil.png", "evil"),
        ("/etc/passwd", "passwd"),
        (".hidden.jpg", "hidden"),
        ("...", "image"),
        ("", "image"),
        ("a/b/", "b"),
        ("fête de l'été.jpeg", "fête de l_été"),
        ("CON.jpg", "CON_"),
        ("nul\x00byte.png", "nul_byte"),
        ("archive.tar.gz", "archive.tar"),
    ],
)
def test_safe_stem_makes_names_safe(name, expected):
    assert safe_stem(name) == expected


def test_safe_stem_caps_characters_and_utf8_bytes():
    assert len(safe_stem("a" * 500 + ".jpg")) == pipeline.MAX_STEM_LENGTH
    # Three bytes a character: a 100-character stem would be too long a file name.
    kanji = safe_stem("写" * 100 + ".jpg")
    assert kanji == "写" * (pipeline.MAX_STEM_BYTES // 3)
    assert safe_stem("😀" * 100 + ".jpg") == "image"


# --- open_image: refusing bad input before decoding -------------------------------------


def test_open_image_refuses_zero_bytes():
    with pytest.raises(ImageRejected, match="empty file"):
        open_image(b"")


def test_open_image_refuses_a_file_over_max_bytes():
    data = encoded(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageRejected, match="over the 10 limit"):
        open_image(data, Limits(max_bytes=10))


def test_open_image_refuses_a_text_file_named_jpg(tmp_path):
    with pytest.raises(ImageRejected, match="not a supported format"):
        build(tmp_path, b"Dear diary, today I took a photo.\n", "photo.jpg")
    assert not list((tmp_path / "out").iterdir()), "no archive, no temporary file"


def test_open_image_refuses_eps_even_though_pillow_reads_it():
    data = encoded(Image.new("RGB", (16, 16), RED), "EPS")
    assert Image.open(io.BytesIO(data)).format == "EPS"
    with pytest.raises(ImageRejected, match="not a supported format"):
        open_image(data)


def psd_bytes(width: int = 4, height: int = 4) -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0)
    return header + sections + bytes(3 * width * height)


def test_open_image_refuses_psd_even_though_pillow_reads_it():
    data = psd_bytes()
    assert Image.open(io.BytesIO(data)).format == "PSD"
    with pytest.raises(ImageRejected, match="not a supported format"):
        open_image(data)


@pytest.mark.parametrize(("image_format", "name"), [("PPM", "x.png"), ("TGA", "x.jpg")])
def test_open_image_decides_by_content_not_by_name(image_format, name, tmp_path):
    with pytest.raises(ImageRejected, match="not a supported format"):
        build(tmp_path, encoded(Image.new("RGB", (16, 16)), image_format), name)


def test_write_archive_takes_a_png_named_jpg_as_png(tmp_path):
    info, _destination = build(tmp_path, encoded(quadrants(64, 64), "PNG"), "really.jpg")
    assert info.format == "PNG"
    # 64x64 fits every box at its own size: one thumbnail, named after its real size.
    assert info.members[1:] == ("really_64x64.png",)
    # The original keeps its bytes but gets the extension its content deserves.
    assert info.members[0] == "really.png"


def test_open_image_refuses_a_bomb_header_before_decoding():
    data = png_header_only(100_000, 100_000)
    with pytest.raises(ImageRejected, match=r"100000x100000 .* over the 200,000,000 pixel limit"):
        open_image(data)


def test_open_image_refuses_between_one_and_two_times_the_limit():
    # Pillow itself only warns in this band; here it is refused like any other bomb.
    data = png_header_only(150, 100)
    with pytest.raises(ImageRejected, match="15,000 pixels"):
        open_image(data, Limits(max_pixels=10_000))


def test_open_image_refuses_over_twice_the_limit():
    with pytest.raises(ImageRejected, match="pixel limit"):
        open_image(png_header_only(300, 100), Limits(max_pixels=10_000))


def test_open_image_follows_our_limit_not_pillows_default():
    # 100 MP is over Pillow's own default (about 89 MP) but under ours.
    before = Image.MAX_IMAGE_PIXELS
    with open_image(png_header_only(10_000, 10_000)) as image:
        assert image.size == (10_000, 10_000)
    assert before == Image.MAX_IMAGE_PIXELS


def test_open_image_leaves_pillows_limit_as_it_was():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected):
        open_image(png_header_only(150, 100), Limits(max_pixels=10_000))
    assert before == Image.MAX_IMAGE_PIXELS


def test_open_image_does_not_decode_pixels():
    with open_image(encoded(Image.new("RGB", (64, 64)), "PNG")) as image:
        assert image.tile, "pixels still to decode"


@pytest.mark.parametrize(
    ("image_format", "keep"),
    [("JPEG", 0.5), ("PNG", 0.5), ("JPEG", 0.05), ("PNG", 0.9)],
)
def test_write_archive_rejects_a_truncated_file(image_format, keep, tmp_path):
    data = encoded(Image.effect_noise((300, 200), 60).convert("RGB"), image_format)
    with pytest.raises(ImageRejected):
        build(tmp_path, data[: int(len(data) * keep)])
    assert not list((tmp_path / "out").iterdir()), "no archive, no temporary file"


def test_write_archive_rejects_a_png_with_a_bad_checksum(tmp_path):
    data = bytearray(encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG"))
    data[40] ^= 0xFF
    with pytest.raises(ImageRejected):
        build(tmp_path, bytes(data), "x.png")


# --- formats and modes ------------------------------------------------------------------


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (300, 200), RED), Image.new("RGB", (300, 200), BLUE)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (300, 200), RED), Image.new("RGB", (300, 200), BLUE)]
    return encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def multipage_tiff() -> bytes:
    frames = [Image.new("RGB", (300, 200), RED), Image.new("RGB", (300, 200), BLUE)]
    return encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:])


CASES = {
    "rgb_jpeg": (lambda: encoded(quadrants(600, 400), "JPEG", quality=95), "JPEG", ".jpg"),
    "progressive_jpeg": (
        lambda: encoded(quadrants(600, 400), "JPEG", quality=95, progressive=True),
        "JPEG",
        ".jpg",
    ),
    "grey_jpeg": (lambda: encoded(quadrants(600, 400, "L"), "JPEG"), "JPEG", ".jpg"),
    "cmyk_jpeg": (lambda: encoded(quadrants(600, 400, "CMYK"), "JPEG"), "JPEG", ".jpg"),
    "rgb_png": (lambda: encoded(quadrants(600, 400), "PNG"), "PNG", ".png"),
    "palette_png": (lambda: encoded(quadrants(600, 400, "P"), "PNG"), "PNG", ".png"),
    "rgba_png": (lambda: encoded(quadrants(600, 400, "RGBA"), "PNG"), "PNG", ".png"),
    "la_png": (lambda: encoded(quadrants(600, 400, "LA"), "PNG"), "PNG", ".png"),
    "one_bit_png": (lambda: encoded(quadrants(600, 400, "1"), "PNG"), "PNG", ".png"),
    "webp": (lambda: encoded(quadrants(600, 400), "WEBP", quality=95), "WEBP", ".webp"),
    "webp_rgba": (lambda: encoded(quadrants(600, 400, "RGBA"), "WEBP"), "WEBP", ".webp"),
    "animated_webp": (animated_webp, "WEBP", ".webp"),
    "gif": (lambda: encoded(quadrants(600, 400, "P"), "GIF"), "GIF", ".png"),
    "animated_gif": (animated_gif, "GIF", ".png"),
    "tiff": (lambda: encoded(quadrants(600, 400), "TIFF"), "TIFF", ".png"),
    "multipage_tiff": (multipage_tiff, "TIFF", ".png"),
    "bmp": (lambda: encoded(quadrants(600, 400), "BMP"), "BMP", ".png"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_write_archive_handles_every_supported_kind(case, tmp_path):
    make, image_format, extension = CASES[case]
    data = make()
    info, destination = build(tmp_path, data, f"in.{image_format.lower()}")
    assert info.format == image_format
    width, height = (600, 400) if not case.startswith(("animated", "multipage")) else (300, 200)
    assert (info.width, info.height) == (width, height)
    thumbs = thumbnails_of(destination)
    fits = sorted({size.fit(width, height) for size in SIZES})
    assert sorted(thumbs) == sorted(f"in_{w}x{h}{extension}" for w, h in fits)
    for size in SIZES:
        fit = size.fit(width, height)
        thumb = thumbs[f"in_{fit[0]}x{fit[1]}{extension}"]
        assert thumb.size == fit == info.thumbnails[size.label]
        assert thumb.mode in ("RGB", "RGBA", "L", "LA")
    with zipfile.ZipFile(destination) as archive:
        assert archive.read(info.members[0]) == data


@pytest.mark.parametrize("case", ["rgb_jpeg", "progressive_jpeg", "rgb_png", "palette_png", "bmp"])
def test_write_archive_keeps_the_colours_where_they_were(case, tmp_path):
    _, destination = build(tmp_path, CASES[case][0](), sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    rgb = thumb.convert("RGB")
    width, height = rgb.size
    assert close_to(rgb.getpixel((2, 2)), RED)
    assert close_to(rgb.getpixel((width - 3, 2)), GREEN)
    assert close_to(rgb.getpixel((2, height - 3)), BLUE)
    assert close_to(rgb.getpixel((width - 3, height - 3)), WHITE)


def test_write_archive_first_frame_of_an_animation(tmp_path):
    for data in (animated_gif(), animated_webp(), multipage_tiff()):
        _, destination = build(tmp_path, data, sizes=parse_sizes("64x64"))
        (thumb,) = thumbnails_of(destination).values()
        assert close_to(thumb.convert("RGB").getpixel((10, 10)), RED)


def test_write_archive_cmyk_jpeg_comes_out_rgb_in_the_right_colours(tmp_path):
    cyan = Image.new("CMYK", (400, 300), (255, 0, 0, 0))
    data = encoded(cyan, "JPEG", quality=95)
    # Pillow writes (and reads) the inverted Adobe flavour of CMYK JPEG.
    assert "adobe" in Image.open(io.BytesIO(data)).info
    _, destination = build(tmp_path, data, sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.mode == "RGB"
    assert close_to(thumb.getpixel((5, 5)), (0, 255, 255))


def test_write_archive_cmyk_with_a_broken_profile_falls_back_to_the_plain_formula(tmp_path):
    broken_profile = bytes(16) + b"CMYK" + bytes(108)
    data = encoded(
        Image.new("CMYK", (400, 300), (0, 255, 0, 0)), "JPEG", icc_profile=broken_profile
    )
    _, destination = build(tmp_path, data, sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert close_to(thumb.getpixel((5, 5)), (255, 0, 255))


def test_write_archive_keeps_an_rgb_colour_profile(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encoded(quadrants(600, 400), "JPEG", icc_profile=profile)
    _, destination = build(tmp_path, data)
    for thumb in thumbnails_of(destination).values():
        assert thumb.info.get("icc_profile") == profile


def test_write_archive_palette_png_with_transparency_keeps_alpha(tmp_path):
    image = quadrants(600, 400, "P")
    red_index = image.getpixel((0, 0))
    data = encoded(image, "PNG", transparency=red_index)
    _, destination = build(tmp_path, data, "p.png", sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.mode == "RGBA"
    assert thumb.getpixel((2, 2))[3] == 0
    assert thumb.getpixel((thumb.width - 3, thumb.height - 3)) == (255, 255, 255, 255)


def test_write_archive_rgba_png_stays_png_with_alpha(tmp_path):
    image = Image.new("RGBA", (600, 400), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (300, 0, 600, 400))
    _, destination = build(tmp_path, encoded(image, "PNG"), "a.png", sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.format == "PNG"
    assert thumb.mode == "RGBA"
    assert thumb.getpixel((2, 2))[3] == 0
    assert thumb.getpixel((thumb.width - 3, 5)) == (0, 0, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_make_thumbnails_composites_alpha_onto_white_for_jpeg(mode):
    image = Image.new("RGBA", (600, 400), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (300, 0, 600, 400))
    data = encoded(image.convert(mode), "PNG")
    with open_image(data) as opened:
        ((_, thumb),) = pipeline.make_thumbnails(opened, parse_sizes("64x64"), "JPEG")
    assert thumb.mode == ("RGB" if mode == "RGBA" else "L")
    white = 255 if mode == "LA" else WHITE
    assert thumb.getpixel((2, 2)) == white
    assert thumb.getpixel((thumb.width - 3, 5)) in (0, (0, 0, 0))
    # And it encodes as a JPEG.
    assert Image.open(io.BytesIO(pipeline.encode(thumb, "JPEG", EncodeOptions()))).size == (64, 43)


def test_write_archive_16_bit_grey_png_scales_to_8_bits(tmp_path):
    image = Image.new("I;16", (600, 400), 0)
    # (Pillow pastes a plain number into I;16 wrongly: paste images.)
    image.paste(Image.new("I;16", (200, 400), 32768), (200, 0))
    image.paste(Image.new("I;16", (200, 400), 65535), (400, 0))
    data = encoded(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    _, destination = build(tmp_path, data, "deep.png", sizes=parse_sizes("60x60"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.mode == "L"
    assert thumb.size == (60, 40)
    left, middle, right = (thumb.getpixel((x, 20)) for x in (3, 30, 57))
    assert left <= 2
    assert 120 <= middle <= 136
    assert right >= 253


def test_write_archive_16_bit_dark_image_does_not_turn_white(tmp_path):
    data = encoded(Image.new("I;16", (300, 200), 2000), "PNG")
    _, destination = build(tmp_path, data, "dark.png", sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.getpixel((10, 10)) == pytest.approx(2000 / 256, abs=1)


@pytest.mark.parametrize(("mode", "value", "expected"), [("I", 1000, 4), ("F", 0.5, 128)])
def test_make_thumbnails_scales_32_bit_and_float_grey(mode, value, expected):
    data = encoded(Image.new(mode, (300, 200), value), "TIFF")
    with open_image(data) as opened:
        ((_, thumb),) = pipeline.make_thumbnails(opened, parse_sizes("64x64"), "PNG")
    assert thumb.mode == "L"
    assert thumb.getpixel((5, 5)) == pytest.approx(expected, abs=1)


def test_write_archive_one_bit_image_stays_black_and_white(tmp_path):
    data = encoded(quadrants(600, 400, "1"), "PNG")
    _, destination = build(tmp_path, data, "bw.png", sizes=parse_sizes("64x64"))
    (thumb,) = thumbnails_of(destination).values()
    assert thumb.mode == "L"
    assert thumb.getpixel((thumb.width - 3, thumb.height - 3)) == 255


# --- orientation, size, aspect ----------------------------------------------------------

# EXIF orientation n means "turn the stored pixels by this to show them": undo it here.
STORE_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented_file(orientation: int, image_format: str) -> bytes:
    shown = quadrants(800, 400)
    method = STORE_AS[orientation]
    stored = shown if method is None else shown.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, image_format, exif=exif.tobytes())


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_write_archive_applies_exif_orientation(orientation, image_format, tmp_path):
    data = oriented_file(orientation, image_format)
    info, destination = build(tmp_path, data, "turned", sizes=parse_sizes("64x64,256x256"))
    assert (info.width, info.height) == (800, 400)
    for thumb in thumbnails_of(destination).values():
        assert thumb.size in ((64, 32), (256, 128))
        rgb = thumb.convert("RGB")
        width, height = rgb.size
        assert close_to(rgb.getpixel((3, 3)), RED, 60)
        assert close_to(rgb.getpixel((width - 4, 3)), GREEN, 60)
        assert close_to(rgb.getpixel((3, height - 4)), BLUE, 60)
        assert "exif" not in thumb.info


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_write_archive_ignores_nonsense_orientation(orientation, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(quadrants(800, 400), "JPEG", exif=exif.tobytes())
    info, _ = build(tmp_path, data, sizes=parse_sizes("64x64"))
    assert (info.width, info.height) == (800, 400)
    assert info.thumbnails == {"64x64": (64, 32)}


def test_write_archive_never_upscales(tmp_path):
    info, destination = build(tmp_path, encoded(quadrants(50, 40), "PNG"), "small.png")
    assert set(info.thumbnails.values()) == {(50, 40)}
    assert {thumb.size for thumb in thumbnails_of(destination).values()} == {(50, 40)}


@pytest.mark.parametrize("source", [(1000, 333), (333, 1000), (4000, 3), (7, 2000), (999, 998)])
def test_write_archive_keeps_the_aspect_within_one_pixel(source, tmp_path):
    data = encoded(Image.new("RGB", source, BLUE), "JPEG")
    info, destination = build(tmp_path, data)
    thumbs = thumbnails_of(destination)
    for label, made in info.thumbnails.items():
        box = ThumbnailSize.parse(label)
        thumb = thumbs[f"photo_{made[0]}x{made[1]}.jpg"]
        scale = min(box.width / source[0], box.height / source[1], 1)
        assert abs(thumb.width - source[0] * scale) <= 1
        assert abs(thumb.height - source[1] * scale) <= 1
        assert thumb.width <= box.width
        assert thumb.height <= box.height


def test_write_archive_jpeg_draft_covers_the_largest_thumbnail(tmp_path):
    # 4000x3000 into 512: libjpeg may decode at 1/4 (1000x750) but not 1/8 (500x375).
    data = encoded(quadrants(4000, 3000), "JPEG")
    info, _ = build(tmp_path, data)
    assert info.thumbnails["512x512"] == (512, 384)


# --- the archive ------------------------------------------------------------------------


def test_write_archive_zip_holds_the_original_byte_for_byte_and_stored(tmp_path):
    data = encoded(quadrants(600, 400), "JPEG", quality=90)
    info, destination = build(tmp_path, data, "Holiday Photo.JPG")
    # The original first, then the thumbnails in the order they are made: largest first.
    assert info.members == (
        "Holiday Photo.jpg",
        "Holiday Photo_512x341.jpg",
        "Holiday Photo_256x171.jpg",
        "Holiday Photo_128x85.jpg",
    )
    assert info.archive_bytes == destination.stat().st_size
    with zipfile.ZipFile(destination) as archive:
        assert archive.testzip() is None
        assert tuple(archive.namelist()) == info.members
        assert archive.read(info.members[0]) == data
        assert {item.compress_type for item in archive.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("../../x.jpg", "x"),
        ("Фото с отпуска 😀.jpg", "Фото с отпуска"),
        ("日本語の写真.jpeg", "日本語の写真"),
        ("a" * 300 + ".jpg", "a" * pipeline.MAX_STEM_LENGTH),
    ],
)
def test_write_archive_member_names_come_from_safe_stem(name, stem, tmp_path):
    info, destination = build(tmp_path, encoded(quadrants(60, 40), "JPEG"), name)
    assert safe_stem(name) == stem
    assert info.members[0] == stem + Path(name).suffix
    assert info.members[-1] == f"{stem}_60x40.jpg"
    with zipfile.ZipFile(destination) as archive:
        for member in archive.namelist():
            assert "/" not in member
            assert "\\" not in member
            assert not member.startswith(".")


def test_write_archive_dedupes_repeated_sizes(tmp_path):
    sizes = [ThumbnailSize(64, 64), ThumbnailSize(32, 32), ThumbnailSize(64, 64)]
    info, _ = build(tmp_path, encoded(quadrants(600, 400), "PNG"), "d.png", sizes=sizes)
    assert info.members == ("d.png", "d_64x43.png", "d_32x21.png")


def test_write_archive_without_sizes_still_checks_the_pixels(tmp_path):
    data = encoded(Image.effect_noise((300, 200), 60).convert("RGB"), "JPEG")
    info, _ = build(tmp_path, data, sizes=())
    assert info.members == ("photo.jpg",)
    with pytest.raises(ImageRejected):
        build(tmp_path, data[: len(data) // 2], sizes=())


def test_write_archive_uses_the_encode_options(tmp_path):
    data = encoded(Image.effect_noise((600, 400), 80).convert("RGB"), "JPEG", quality=95)
    small, _ = build(tmp_path, data, options=EncodeOptions(jpeg_quality=20))
    large, _ = build(tmp_path, data, options=EncodeOptions(jpeg_quality=95))
    assert small.archive_bytes < large.archive_bytes


def test_write_archive_replaces_an_existing_archive(tmp_path):
    destination = tmp_path / "out" / "archive.zip"
    destination.parent.mkdir()
    destination.write_bytes(b"old")
    build(tmp_path, encoded(quadrants(60, 40), "PNG"), "new.png")
    with zipfile.ZipFile(destination) as archive:
        assert archive.namelist()[0] == "new.png"
    assert_no_temporary_files(destination.parent)


# --- writing ---------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("libvips", [False, True])
def test_write_archive_takes_an_image_whose_exif_is_not_tiff(image_format, libvips):
    # An EXIF block Pillow cannot parse says nothing about orientation: the pixels are made
    # as stored, where the memory check (which reads the orientation) used to raise.
    buffer = io.BytesIO()
    bad_exif = b"Exif\x00\x00XX\x00\x00not-tiff"
    Image.new("RGB", (640, 480), "red").save(buffer, image_format, exif=bad_exif)
    out = io.BytesIO()
    info = pipeline.write_archive(
        buffer.getvalue(),
        "bad-exif.img",
        out,
        pipeline.parse_sizes("64x64"),
        limits=pipeline.Limits(memory_bytes=pipeline.memory_in_use() + 256 * pipeline.MiB),
        libvips=libvips,
    )
    assert (info.width, info.height, info.format) == (640, 480, image_format)
    assert info.thumbnails == {"64x64": (64, 48)}

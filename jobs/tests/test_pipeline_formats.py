"""Phone formats in (HEIC, AVIF) and output presets out: format, cover, metadata, colour.

Every input is generated here with Pillow or pillow-heif; no image file is committed.
"""

from __future__ import annotations

import io
import math
import zipfile

import pillow_heif
import pytest
from PIL import Image, ImageCms, ImageFilter, ImageStat

from jobs import pipeline
from jobs.pipeline import EncodeOptions, ThumbnailSize, parse_sizes, write_archive

from .icc import ADOBE_RGB, DISPLAY_P3, grey_profile, rgb_profile
from .test_pipeline import BLUE, GREEN, RED, WHITE, close_to, encoded, quadrants

# What undoes each EXIF orientation's turn: a file stored this way, tagged `orientation`,
# shows the upright image.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def archive(data: bytes, name: str, sizes, libvips: bool = False, **options: object):
    out = io.BytesIO()
    info = write_archive(
        data, name, out, parse_sizes(sizes), options=EncodeOptions(**options), libvips=libvips
    )
    with zipfile.ZipFile(out) as zipped:
        thumbs = {}
        for member in zipped.namelist()[1:]:
            thumb = Image.open(io.BytesIO(zipped.read(member)))
            thumb.load()
            thumbs[member] = thumb
    return info, thumbs


def assert_upright_quadrants(thumb: Image.Image, tolerance: int = 40) -> None:
    rgb = thumb.convert("RGB")
    width, height = rgb.size
    assert close_to(rgb.getpixel((3, 3)), RED, tolerance)
    assert close_to(rgb.getpixel((width - 4, 3)), GREEN, tolerance)
    assert close_to(rgb.getpixel((3, height - 4)), BLUE, tolerance)
    assert close_to(rgb.getpixel((width - 4, height - 4)), WHITE, tolerance)


def stored_with_orientation(image: Image.Image, image_format: str, orientation: int) -> bytes:
    turn = STORED[orientation]
    stored = image.transpose(turn) if turn is not None else image
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, image_format, exif=exif.tobytes(), quality=90)


# --- inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("image_format", "name"), [("HEIF", "p.heic"), ("AVIF", "p.avif")])
def test_write_archive_phone_formats_come_out_upright_for_every_orientation(
    image_format, name, orientation
):
    data = stored_with_orientation(quadrants(300, 200), image_format, orientation)
    info, thumbs = archive(data, name, "128x128,64x64")
    assert info.format == image_format
    assert (info.width, info.height) == (300, 200)
    assert info.thumbnails == {"128x128": (128, 85), "64x64": (64, 43)}
    # JPEG by default: every viewer shows it.
    stem = name.split(".")[0]
    assert sorted(thumbs) == [f"{stem}_128x85.jpg", f"{stem}_64x43.jpg"]
    assert info.members[0] == name
    for thumb in thumbs.values():
        assert thumb.format == "JPEG"
        assert_upright_quadrants(thumb)


def sixteen_bit_heic(image: Image.Image, twelve: bool = False) -> bytes:
    """A 10-bit (or 12-bit) HEIC of an 8-bit RGB image, through pillow-heif's 16-bit input."""
    wide = bytes(value for byte in image.tobytes() for value in (byte, byte))  # v * 257, LE
    heif = pillow_heif.from_bytes("RGB;16", image.size, wide)
    previous = pillow_heif.options.SAVE_HDR_TO_12_BIT
    pillow_heif.options.SAVE_HDR_TO_12_BIT = twelve
    try:
        buffer = io.BytesIO()
        heif.save(buffer, quality=90)
    finally:
        pillow_heif.options.SAVE_HDR_TO_12_BIT = previous
    return buffer.getvalue()


@pytest.mark.parametrize(("twelve", "depth"), [(False, 10), (True, 12)])
def test_write_archive_reads_a_deep_heic_into_8_bit_thumbnails(twelve, depth):
    data = sixteen_bit_heic(quadrants(300, 200), twelve)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.info["bit_depth"] == depth  # really a deep file
    info, thumbs = archive(data, "deep.heic", "100x100")
    assert info.thumbnails == {"100x100": (100, 67)}
    (thumb,) = thumbs.values()
    assert (thumb.mode, thumb.format) == ("RGB", "JPEG")
    assert_upright_quadrants(thumb)


def test_write_archive_heic_with_alpha_becomes_png_and_keeps_it():
    image = quadrants(300, 200, "RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 150, 100))  # the red quadrant made transparent
    info, thumbs = archive(encoded(image, "HEIF", quality=90), "a.heic", "150x150")
    (name,) = thumbs
    assert name == "a_150x100.png"
    thumb = thumbs[name]
    assert thumb.mode == "RGBA"
    assert thumb.getpixel((3, 3))[3] < 20
    assert thumb.getpixel((146, 3))[3] > 235
    assert close_to(thumb.getpixel((146, 3))[:3], GREEN)
    assert info.output_format == "PNG"


def test_write_archive_takes_the_primary_image_of_a_multi_image_heic():
    heif = pillow_heif.from_pillow(Image.new("RGB", (200, 100), BLUE))
    heif.add_from_pillow(quadrants(300, 200))
    buffer = io.BytesIO()
    heif.save(buffer, quality=90, primary_index=1)
    info, thumbs = archive(buffer.getvalue(), "burst.heic", "100x100")
    assert (info.width, info.height) == (300, 200)
    assert_upright_quadrants(thumbs["burst_100x67.jpg"])


def test_write_archive_refuses_a_truncated_heic():
    data = encoded(quadrants(300, 200), "HEIF", quality=90)
    with pytest.raises(pipeline.ImageRejected):
        archive(data[: len(data) // 2], "cut.heic", "64x64")


def corrupt_avif() -> bytes:
    """An AVIF whose primary-item box is renamed: libavif raises RuntimeError on it."""
    good = encoded(Image.effect_noise((40, 30), 60).convert("RGB"), "AVIF", quality=50)
    at = good.index(b"pitm")
    return good[:at] + b"pitX" + good[at + 4 :]


def test_write_archive_refuses_a_corrupt_avif_as_bad_input():
    with pytest.raises(pipeline.ImageRejected, match="corrupt image header"):
        archive(corrupt_avif(), "broken.avif", "64x64")


@pytest.mark.parametrize(("mode", "key"), [("RGB", (255, 0, 255)), ("L", 7), ("1", 0)])
@pytest.mark.parametrize("output", ["same", "webp", "jpeg"])
def test_write_archive_makes_a_png_colour_key_transparent(mode, key, output):
    image = Image.new(mode, (400, 200), key)
    image.paste(255 if mode != "RGB" else (0, 0, 255), (0, 0, 100, 200))  # opaque left end
    _, thumbs = archive(encoded(image, "PNG", transparency=key), "key.png", "64x64", format=output)
    (thumb,) = thumbs.values()
    opaque, keyed = (
        thumb.convert("RGBA").getpixel((2, 16)),
        thumb.convert("RGBA").getpixel((60, 16)),
    )
    if output == "jpeg":
        assert close_to(keyed, (*WHITE, 255))  # laid on white
    else:
        assert keyed[3] == 0
    assert opaque[3] == 255


def test_write_archive_reads_a_lab_tiff_as_opaque_colour():
    srgb_to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    red = ImageCms.applyTransform(Image.new("RGB", (400, 200), (200, 30, 30)), srgb_to_lab)
    assert red.mode == "LAB"
    _, thumbs = archive(encoded(red, "TIFF"), "red.tif", "64x64")
    (thumb,) = thumbs.values()
    # LAB's A is a colour axis, not alpha.
    assert thumb.mode == "RGB"
    assert close_to(thumb.getpixel((32, 16)), (200, 30, 30))


# --- colour -----------------------------------------------------------------------------


def lab(rgb: tuple[int, int, int], profile: ImageCms.ImageCmsProfile) -> tuple[float, ...]:
    """CIE L*a*b* (D50) of an 8-bit RGB colour in `profile`, through LittleCMS."""
    to_lab = ImageCms.buildTransform(profile, ImageCms.createProfile("LAB"), "RGB", "LAB")
    lightness, a, b = ImageCms.applyTransform(Image.new("RGB", (1, 1), rgb), to_lab).getpixel(
        (0, 0)
    )
    return lightness * 100 / 255, a - 128, b - 128


def delta_e(first: tuple[float, ...], second: tuple[float, ...]) -> float:
    """CIE76: the distance in L*a*b*; about 2.3 is a just noticeable difference."""
    return math.dist(first, second)


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Saturated, yet inside sRGB's gamut, so that a right conversion can match it.
PATCH = (210, 60, 50)


@pytest.mark.parametrize(
    ("description", "colourants"),
    [("Display P3", DISPLAY_P3), ("Adobe RGB (1998)", ADOBE_RGB)],
)
def test_write_archive_converts_a_wide_gamut_jpeg_to_srgb(description, colourants):
    icc = rgb_profile(description, colourants)
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    data = encoded(Image.new("RGB", (400, 300), PATCH), "JPEG", quality=95, icc_profile=icc)
    _, thumbs = archive(data, "wide.jpg", "64x64")
    (thumb,) = thumbs.values()
    assert "icc_profile" not in thumb.info  # untagged: sRGB to every browser
    made = thumb.getpixel((32, 24))
    assert delta_e(lab(PATCH, source), lab(made, SRGB)) < 3
    # Left as they were, the same numbers would look clearly different in sRGB.
    assert delta_e(lab(PATCH, source), lab(PATCH, SRGB)) > 6


P3_NCLX = {
    "color_primaries": 12,
    "transfer_characteristics": 13,
    "matrix_coefficients": 6,
    "full_range_flag": 1,
}


@pytest.mark.parametrize("output", ["same", "webp"])
def test_write_archive_converts_a_heic_described_as_display_p3_by_nclx_alone(output):
    # As phones write them: no ICC profile, the primaries and curve named in an nclx box.
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(rgb_profile("Display P3", DISPLAY_P3)))
    data = encoded(Image.new("RGB", (400, 300), PATCH), "HEIF", quality=95, nclx_profile=P3_NCLX)
    decoded = Image.open(io.BytesIO(data))
    assert "icc_profile" not in decoded.info
    stored = decoded.convert("RGB").getpixel((200, 150))  # the patch after HEVC's rounding
    _, thumbs = archive(data, "phone.heic", "64x64", format=output)
    (thumb,) = thumbs.values()
    assert "icc_profile" not in thumb.info
    # Within 4: the reference's tone curve is a 2.2 gamma, nclx's the sRGB curve it
    # approximates. Left as they were, the numbers would be twice as far off.
    assert delta_e(lab(stored, p3), lab(thumb.getpixel((32, 24)), SRGB)) < 4
    assert delta_e(lab(stored, p3), lab(stored, SRGB)) > 8


def test_write_archive_keeps_an_nclx_display_p3_as_a_profile_when_asked():
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(rgb_profile("Display P3", DISPLAY_P3)))
    data = encoded(Image.new("RGB", (400, 300), PATCH), "HEIF", quality=95, nclx_profile=P3_NCLX)
    _, thumbs = archive(data, "phone.heic", "64x64", colour="keep")
    (thumb,) = thumbs.values()
    assert close_to(thumb.getpixel((32, 24)), PATCH, 4)
    kept = ImageCms.ImageCmsProfile(io.BytesIO(thumb.info["icc_profile"]))
    # The profile says Display P3 (within 4 of the reference, whose tone curve is a 2.2
    # gamma), not sRGB.
    assert delta_e(lab(PATCH, p3), lab(PATCH, kept)) < 4
    assert delta_e(lab(PATCH, SRGB), lab(PATCH, kept)) > 8


def test_nclx_display_p3_becomes_the_published_profiles_colourants():
    from jobs.icc import nclx_profile

    # As pillow-heif reports a P3 HEIC's box: the codes and their xy.
    nclx = {
        **P3_NCLX,
        "color_primary_red_x": 0.68,
        "color_primary_red_y": 0.32,
        "color_primary_green_x": 0.265,
        "color_primary_green_y": 0.69,
        "color_primary_blue_x": 0.15,
        "color_primary_blue_y": 0.06,
        "color_primary_white_x": 0.3127,
        "color_primary_white_y": 0.329,
    }
    made = ImageCms.ImageCmsProfile(io.BytesIO(nclx_profile(nclx) or b"")).profile
    for colourant, published in zip(
        (made.red_colorant, made.green_colorant, made.blue_colorant), DISPLAY_P3, strict=True
    ):
        assert colourant[0] == pytest.approx(published, abs=2e-4)
    assert nclx_profile({**nclx, "transfer_characteristics": 16}) is None  # PQ: HDR
    assert nclx_profile({**nclx, "color_primaries": 1}) is None  # sRGB's own
    assert nclx_profile({"color_primaries": 12}) is None  # no primaries given
    assert nclx_profile(None) is None


def test_write_archive_leaves_a_heic_described_as_srgb_by_nclx_as_it_is():
    srgb = {**P3_NCLX, "color_primaries": 1}
    data = encoded(Image.new("RGB", (400, 300), PATCH), "HEIF", quality=95, nclx_profile=srgb)
    _, thumbs = archive(data, "phone.heic", "64x64", colour="keep")
    (thumb,) = thumbs.values()
    assert "icc_profile" not in thumb.info
    assert close_to(thumb.getpixel((32, 24)), PATCH, 4)


def test_write_archive_keeps_a_wide_gamut_profile_when_asked():
    icc = rgb_profile("Display P3", DISPLAY_P3)
    data = encoded(Image.new("RGB", (400, 300), PATCH), "JPEG", quality=95, icc_profile=icc)
    _, thumbs = archive(data, "wide.jpg", "64x64", colour="keep")
    (thumb,) = thumbs.values()
    assert thumb.info["icc_profile"] == icc
    assert close_to(thumb.getpixel((32, 24)), PATCH, 4)


@pytest.mark.parametrize(
    ("mode", "name", "output", "written"),
    [
        ("L", "grey.jpg", "webp", "RGB"),
        ("LA", "grey.png", "webp", "RGBA"),
        ("LA", "grey.png", "avif", "RGBA"),
        ("L", "grey.jpg", "same", "L"),
        ("LA", "grey.png", "same", "LA"),
        ("L", "grey.jpg", "avif", "L"),
    ],
)
@pytest.mark.parametrize("colour", ["srgb", "keep"])
@pytest.mark.parametrize("libvips", [False, True])
def test_write_archive_writes_grey_with_its_profile_only_where_the_format_stays_grey(
    mode, name, output, written, colour, libvips
):
    # A linear grey (gamma 1.0, as scanners and some editors tag it): 64 is a dark grey in
    # sRGB's numbers, but a mid grey (sRGB 137) through the profile.
    icc = grey_profile("Gray Gamma 1.0", 1.0)
    fill = 64 if mode == "L" else (64, 200)
    source_format = "JPEG" if mode == "L" else "PNG"
    data = encoded(Image.new(mode, (400, 300), fill), source_format, icc_profile=icc)
    _, thumbs = archive(data, name, "64x64", format=output, colour=colour, libvips=libvips)
    (thumb,) = thumbs.values()
    assert thumb.mode == written
    grey = thumb.convert("L").getpixel((32, 24))
    if written in ("L", "LA"):
        # Grey stays grey, its profile with it, whatever `colour` says (it is no wide gamut).
        assert thumb.info.get("icc_profile") == icc
        assert abs(grey - 64) <= 2, grey
        return
    # In colour a grey profile would describe nothing: converted through it to sRGB.
    assert "icc_profile" not in thumb.info
    red, green, blue = thumb.getpixel((32, 24))[:3]
    assert red == green == blue, (red, green, blue)
    assert abs(red - 137) <= 4, red


@pytest.mark.parametrize("output", ["same", "jpeg", "webp"])
def test_write_archive_leaves_out_a_colour_profile_too_large_to_carry(output):
    # 2 MB said to be an RGB profile, in a TIFF of 300 KB: copied into each of 20 thumbnails
    # it made a zip of 40 MB, and PNGs that Pillow refuses to open (over its 1 MB iCCP).
    icc = bytearray(rgb_profile("Padded", DISPLAY_P3).ljust(2 * pipeline.MiB, b"\0"))
    icc[:4] = len(icc).to_bytes(4, "big")
    data = encoded(quadrants(500, 200), "TIFF", icc_profile=bytes(icc))
    sizes = ",".join(f"{edge}x{edge}" for edge in range(20, 420, 20))
    info, thumbs = archive(data, "big.tif", sizes, format=output, colour="keep")
    assert len(thumbs) == 20
    assert info.archive_bytes < 2 * len(data)
    assert not any("icc_profile" in thumb.info for thumb in thumbs.values())
    assert_upright_quadrants(next(iter(thumbs.values())))


# --- fit --------------------------------------------------------------------------------

COVER_SIZES = "128x128,200x100,64x96"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ((300, 600), {"128x128": (128, 128), "200x100": (200, 100), "64x96": (64, 96)}),
        ((600, 300), {"128x128": (128, 128), "200x100": (200, 100), "64x96": (64, 96)}),
        # Smaller than the boxes: cut to each box's aspect at the source's own size.
        ((50, 30), {"128x128": (30, 30), "200x100": (50, 25), "64x96": (20, 30)}),
        ((100, 150), {"128x128": (100, 100), "200x100": (100, 50), "64x96": (64, 96)}),
    ],
)
def test_write_archive_cover_makes_exactly_the_box_never_upscaled(source, expected):
    info, thumbs = archive(encoded(quadrants(*source), "PNG"), "c.png", COVER_SIZES, fit="cover")
    assert info.thumbnails == expected
    assert sorted(thumb.size for thumb in thumbs.values()) == sorted(set(expected.values()))
    for (width, height), thumb in ((thumb.size, thumb) for thumb in thumbs.values()):
        # Cut around the centre: the four quadrants meet in the middle of every thumbnail.
        rgb = thumb.convert("RGB")
        assert close_to(rgb.getpixel((0, 0)), RED, 60)
        assert close_to(rgb.getpixel((width - 1, height - 1)), WHITE, 60)


def sharpness(image: Image.Image) -> float:
    return ImageStat.Stat(image.convert("L").filter(ImageFilter.FIND_EDGES)).stddev[0]


def test_write_archive_cover_decodes_a_jpeg_large_enough_for_the_cut():
    # 4:1 noise: covering a 256 px box takes the image at 1024x256, where contain's 256x64
    # would let the JPEG decode at 1/8 (500x125), to be enlarged again: blurred.
    source = Image.effect_noise((4000, 1000), 80).convert("RGB")
    _, from_jpeg = archive(encoded(source, "JPEG", quality=95), "n.jpg", "256x256", fit="cover")
    _, from_png = archive(encoded(source, "PNG"), "n.png", "256x256", fit="cover")
    assert sharpness(from_jpeg["n_256x256.jpg"]) > 0.8 * sharpness(from_png["n_256x256.png"])


def test_write_archive_cover_turns_before_it_cuts():
    data = stored_with_orientation(quadrants(300, 600), "JPEG", 6)
    info, thumbs = archive(data, "turned.jpg", "100x50", fit="cover")
    assert (info.width, info.height) == (300, 600)
    assert info.thumbnails == {"100x50": (100, 50)}
    (thumb,) = thumbs.values()
    # The middle band of an upright portrait: red and green above, blue and white below.
    assert close_to(thumb.getpixel((5, 5)), RED)
    assert close_to(thumb.getpixel((94, 44)), WHITE)


def test_write_archive_cover_with_attention_keeps_the_busy_part():
    # A flat grey panorama with a checkerboard near its right end.
    image = Image.new("RGB", (900, 100), (128, 128, 128))
    for x in range(700, 800, 10):
        for y in range(0, 100, 10):
            if (x + y) // 10 % 2:
                image.paste((0, 0, 0), (x, y, x + 10, y + 10))
            else:
                image.paste((255, 255, 255), (x, y, x + 10, y + 10))
    data = encoded(image, "PNG")
    _, centred = archive(data, "pano.png", "100x100", fit="cover")
    _, attentive = archive(data, "pano.png", "100x100", fit="cover", gravity="attention")
    assert centred["pano_100x100.png"].convert("L").getextrema() == (128, 128)
    low, high = attentive["pano_100x100.png"].convert("L").getextrema()
    assert (low, high) == (0, 255)


def test_write_archive_cover_with_attention_sees_detail_in_16_bit_grey():
    # Flat 16-bit grey with a checkerboard above 8 bits' range at its right end.
    image = Image.new("I;16", (600, 200), 1000)
    for x in range(400, 600, 10):
        for y in range(0, 200, 10):
            if (x // 10 + y // 10) % 2:
                image.paste(60000, (x, y, x + 10, y + 10))
    _, thumbs = archive(encoded(image, "PNG"), "g.png", "100x100", fit="cover", gravity="attention")
    low, high = thumbs["g_100x100.png"].getextrema()
    assert high - low > 50  # the checkerboard, not the flat part


def test_plan_size_contain_is_the_fit():
    assert pipeline.plan_size(ThumbnailSize(100, 100), 400, 200) == ((100, 50), (100, 50))


# --- metadata ---------------------------------------------------------------------------


def tagged_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "Phone maker"
    exif[0x0110] = "Phone 15"
    exif[0x013B] = "A. Photographer"
    exif[0x8298] = "(c) A. Photographer"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    exif[0x8769] = {0x9003: "2026:11:28 09:00:00"}
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    return encoded(quadrants(300, 200), "JPEG", exif=exif.tobytes(), xmp=xmp)


def test_tagged_jpeg_really_carries_gps_and_xmp():
    with Image.open(io.BytesIO(tagged_jpeg())) as image:
        assert image.getexif().get_ifd(0x8825)[1] == "N"
        assert "xmp" in image.info


@pytest.mark.parametrize("output", ["jpeg", "webp", "same", "avif"])
def test_write_archive_strips_every_tag_by_default(output):
    _, thumbs = archive(tagged_jpeg(), "gps.jpg", "128x128,64x64", format=output)
    for thumb in thumbs.values():
        assert len(thumb.getexif()) == 0
        assert "xmp" not in thumb.info


@pytest.mark.parametrize("output", ["jpeg", "webp", "avif"])
def test_write_archive_keeps_who_and_what_but_not_where(output):
    _, thumbs = archive(tagged_jpeg(), "gps.jpg", "128x128", format=output, metadata="keep")
    (thumb,) = thumbs.values()
    exif = thumb.getexif()
    assert exif[0x013B] == "A. Photographer"
    assert exif[0x8298] == "(c) A. Photographer"
    assert exif[0x0110] == "Phone 15"
    assert exif.get_ifd(0x8769)[0x9003] == "2026:11:28 09:00:00"
    assert not exif.get_ifd(0x8825)
    assert 0x0112 not in exif  # applied to the pixels, so not said again
    assert "xmp" not in thumb.info


@pytest.mark.parametrize("output", ["jpeg", "webp", "avif"])
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_write_archive_keeps_who_made_it_byte_for_byte_beyond_ascii(output, encoding):
    # EXIF's text is ASCII by the standard, but cameras and editors write UTF-8 or Latin-1
    # there: "©" in a copyright, umlauts in a name. Pillow reads the bytes as Latin-1 and
    # writes a str back as ASCII, "?" for the rest.
    exif = Image.Exif()
    exif[0x013B] = "Jürgen Müller".encode(encoding)
    exif[0x8298] = "© 2026 Jürgen Müller".encode(encoding)
    data = encoded(quadrants(300, 200), "JPEG", exif=exif.tobytes())
    _, thumbs = archive(data, "named.jpg", "128x128", format=output, metadata="keep")
    (thumb,) = thumbs.values()
    kept = thumb.getexif()
    assert kept[0x013B].encode("latin-1") == "Jürgen Müller".encode(encoding)
    assert kept[0x8298].encode("latin-1") == "© 2026 Jürgen Müller".encode(encoding)


def test_write_archive_keeps_gps_only_when_asked():
    _, thumbs = archive(tagged_jpeg(), "gps.jpg", "128x128", metadata="keep", gps=True)
    (thumb,) = thumbs.values()
    gps = thumb.getexif().get_ifd(0x8825)
    assert gps[1] == "N"
    assert gps[3] == "E"


def test_write_archive_keeps_what_metadata_a_jpeg_can_hold():
    # A JPEG holds 64 KB of EXIF: a 70 KB description made the image fail as unencodable.
    exif = Image.Exif()
    exif[0x010E] = "a very long caption " * 3500
    exif[0x8298] = "(c) A. Photographer"
    data = encoded(quadrants(300, 200), "PNG", exif=exif.tobytes())
    _, thumbs = archive(data, "long.png", "128x128", format="jpeg", metadata="keep")
    (thumb,) = thumbs.values()
    kept = thumb.getexif()
    assert kept[0x8298] == "(c) A. Photographer"
    assert 0x010E not in kept


# --- output format ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "extension", "pillow_format"),
    [("webp", ".webp", "WEBP"), ("avif", ".avif", "AVIF"), ("jpeg", ".jpg", "JPEG")],
)
def test_write_archive_writes_the_format_asked_for(output, extension, pillow_format):
    info, thumbs = archive(encoded(quadrants(300, 200), "PNG"), "q.png", "100x100", format=output)
    assert list(thumbs) == [f"q_100x67{extension}"]
    assert thumbs[f"q_100x67{extension}"].format == pillow_format
    assert info.output_format == pillow_format
    assert info.notes == ()
    assert_upright_quadrants(thumbs[f"q_100x67{extension}"])


def test_fallback_format_leaves_webp_within_its_limit_and_falls_back_beyond():
    limit = pipeline.MAX_OUTPUT_EDGE["WEBP"]
    assert pipeline.fallback_format("WEBP", (limit, 10), "RGB") == "WEBP"
    assert pipeline.fallback_format("WEBP", (10, limit + 1), "RGB") == "JPEG"
    assert pipeline.fallback_format("WEBP", (limit + 1, 10), "RGBA") == "PNG"
    assert pipeline.fallback_format("AVIF", (70000, 10), "L") == "JPEG"
    assert pipeline.fallback_format("PNG", (70000, 10), "RGB") == "PNG"


def test_thumbnails_cannot_reach_the_webp_limit_today():
    # Why the fallback is tested on its own: no box may ask for more than MAX_EDGE.
    assert pipeline.MAX_OUTPUT_EDGE["WEBP"] > pipeline.MAX_EDGE

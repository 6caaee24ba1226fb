"""Pure image work: validate, orient, thumbnail, encode, and pack the zip.

No Django, no Celery, no settings: every function takes what it needs as arguments, so it
can be tested on pixels and benchmarked on its own.

Where the time goes, and why the code is shaped this way: a JPEG is decoded once, by
libjpeg at the smallest 1/2, 1/4 or 1/8 scale that still covers the largest thumbnail
(`draft`); every other step then works on small images. Thumbnails are made largest first,
each from the one before (a cascade), so no step reads more pixels than it needs. Mode
conversions (CMYK, 16-bit, alpha onto white) and EXIF rotation happen on the thumbnails,
not on the decoded image. Thumbnails are stored, not deflated, in the zip: they are
compressed already.

Memory: before any pixel is decoded, what the decode and the thumbnails will hold is
estimated from the header (`estimate_memory`) and an image that would not fit the worker's
budget (`Limits.memory_bytes`) is refused. A large decoded image is shrunk to the first
thumbnail a strip at a time, converting and premultiplying only the strip, and is freed as
soon as the strips are done; each thumbnail is encoded straight into the zip, then
dropped. So besides the original's bytes, only the decoded image or the thumbnail the next
size is made from is ever held whole.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import time
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, cast

import pillow_heif
from PIL import Image, ImageCms, ImageFilter, UnidentifiedImageError

from .icc import nclx_profile

# HEIC/HEIF (iPhones) through libheif. Its embedded thumbnails, depth maps and auxiliary
# images are never used: not reading them keeps them out of memory. libheif applies the
# file's irot/imir transforms and pillow-heif resets the EXIF orientation to 1 then, so the
# image comes out upright once, never twice. (AVIF is Pillow's own: it turns irot/imir into
# the EXIF orientation, which the cascade applies like a JPEG's.)
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# Formats Pillow may open: an allow-list, so that no other decoder (EPS/Ghostscript, PSD,
# ...) ever sees untrusted bytes. The format is decided by content, never by the name.
# MPO (a multi-picture JPEG) has no opener of its own: Pillow's JPEG opener returns it.
# A multi-image HEIC opens at its primary image. 10- and 12-bit HEIC and AVIF decode to
# 8 bits per channel (both plugins' default), which is what every output format holds.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "HEIF", "AVIF")
# Thumbnails keep the input's family: lossy stays JPEG/WebP, everything else becomes PNG.
# Phone photos (HEIC, AVIF) become JPEG, which every viewer shows; with alpha, PNG (see
# output_format_for).
OUTPUT_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP", "HEIF": "JPEG", "AVIF": "JPEG"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "AVIF": ".avif"}
# The grey modes each output format writes as grey; Pillow writes other grey in colour.
GREY_MODES = {"JPEG": ("L",), "PNG": ("L", "LA"), "WEBP": (), "AVIF": ("L",)}
ORIGINAL_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg", ".mpo"),
    "PNG": (".png", ".apng"),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp", ".dib"),
    "HEIF": (".heic", ".heif", ".hif"),
    "AVIF": (".avif",),
}
MAX_SIZES = 20
# Thumbnails are never larger than the input, but a bigger box lets one image hold more:
# a 4096x4096 thumbnail is 64 MB in RGBA or 32-bit grey, and is copied while it is
# converted, turned and encoded. 4096 covers 4K screens (3840x2160) and fits, with the
# rows it is shrunk from, in a 400 MB worker (see estimate_memory).
MAX_EDGE = 4096
MAX_STEM_LENGTH = 100
# Bytes, not characters, are what file systems limit (255 per name on most): leave room
# for "_10000x10000.webp" and the like after the stem.
MAX_STEM_BYTES = 200
# A resize first shrinks by a whole factor with a box filter while the result stays at
# least this many times the target, then finishes with Lanczos. 2.0 is Pillow's own choice
# for thumbnail(); measured on a 4096x2304 PNG it halves the resize time against 3.0, for a
# mean difference to a pure Lanczos of under 0.2 levels in 255.
REDUCING_GAP = 2.0
MiB = 1 << 20
# A decoded image of more pixels than this, that must be converted (palette, 16-bit),
# premultiplied (alpha) or reduced on its way to the first thumbnail, goes through the first
# resize pass in strips of about this many pixels, so that none of those copies is ever made
# of the whole image. Measured on the bench corpus's 2-9 MP PNGs and WebPs, strips also took
# 4% less CPU than Pillow's resize in one go.
STRIP_PIXELS = 1 << 20
# Added to every estimate: decoders' line buffers and state (zlib, libjpeg), Python
# objects, and library code paged in for the first time. A worker's OS limit leaves the
# same room for the latter (jobs/worker.py).
MEMORY_SLACK = 16 * MiB

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_UNSAFE_CHARACTERS = re.compile(r"[^\w.\- ]+")
_WINDOWS_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM\d|LPT\d)$", re.IGNORECASE)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)
# What Pillow's decoders raise on hostile or broken input. Anything else is a bug of ours.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    # Pillow's AVIF plugin and pillow-heif raise it for a file libavif/libheif cannot read.
    RuntimeError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# Modes Pillow resamples well. "P" and "1" would be resized by nearest neighbour, 16-bit
# modes cannot be reduce()d, "PA", "RGBX" and friends not resized at all: they are converted
# first.
_RESIZABLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")
# Pillow resamples alpha premultiplied: an RGBA image is converted to RGBa and back.
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}
# Pillow's WebP decoder (libwebp's animation decoder, even for a still image) allocates two
# canvases of 4 bytes per pixel when the file is opened and keeps them while the image
# lives (_load drops them), and hands the frame over as bytes the pixels are copied from.
# Measured on 12 MP and 48 MP WebPs, lossy and lossless, with and without alpha: 16 to 17
# bytes per pixel at the peak of load(), pixels included, with a copy of the file.
WEBP_CANVAS_BYTES = 8
WEBP_DECODER_BYTES = 13
# libheif decodes into YCbCr planes, converts them into an interleaved RGB(A) image of its
# own and pillow-heif copies that into Pillow's; libavif (Pillow's AVIF plugin) does the
# same through an RGBA buffer. Measured beyond Pillow's 4 bytes a pixel, at the peak of
# load(), 6-24 MP: HEIC 3.4 (RGB) and 4.3 (RGBA), AVIF 5.2-5.3 bytes per pixel.
HEIF_DECODER_BYTES = 5
AVIF_DECODER_BYTES = 6
# libavif and libaom encode a thumbnail (speed 8) through YUV planes, their frame buffers
# and the bitstream. Measured, 1024-3840 px square: 17 bytes a pixel for grey, 19-29 for
# RGB, 22-32 for RGBA, the most for noise at quality 100.
AVIF_ENCODER_BYTES = 32
# The largest side each output format can hold; a thumbnail over it is written as JPEG (PNG
# with alpha) instead. WebP's is in its bitstream (14 bits); AV1's frame size is 16 bits.
MAX_OUTPUT_EDGE = {"WEBP": 16383, "AVIF": 65536, "JPEG": 65535}
# Output presets (EncodeOptions): the names a sweep's options may carry.
FORMAT_CHOICES = ("same", "jpeg", "webp", "avif")
FIT_CHOICES = ("contain", "cover")
GRAVITY_CHOICES = ("centre", "attention")
METADATA_CHOICES = ("strip", "keep")
COLOUR_CHOICES = ("srgb", "keep")
# What `metadata=keep` keeps of the EXIF: who made it, with what, when. Nothing that says
# where (GPS, kept only with gps=keep), and no orientation (applied to the pixels).
KEPT_EXIF_TAGS = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298)
KEPT_EXIF_IFD_TAGS = (
    0x829A,
    0x829D,
    0x8827,
    0x9003,
    0x9004,
    0x920A,
    0xA430,
    0xA431,
    0xA432,
    0xA433,
    0xA434,
)
_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
# The most EXIF a JPEG holds (one APP1 marker): kept metadata over it leaves out its longest
# values, whatever the format, rather than failing the image.
MAX_EXIF_BYTES = 65533
# The largest colour profile thumbnails carry: what Pillow reads back from a PNG's iCCP
# (PngImagePlugin.MAX_TEXT_CHUNK). Real ones are a few KB (matrix) to a few hundred (LUT); a
# larger one (a TIFF's may be as large as the file) would be copied into every thumbnail.
MAX_ICC_BYTES = 1 * MiB
# Formats libvips decodes and shrinks to the first thumbnail when write_archive is asked to
# (`libvips=True`), once Pillow has identified the file and checked its limits. WebP:
# libwebp decodes straight to a reduced scale, Pillow only at full size. PNG: libspng
# decodes faster than Pillow's zlib path, and libvips' shrink and Lanczos reduce take the
# rows as they come, so the full-size image is never held. Measured on the mixed corpus's
# 41 real PNGs and 14 WebPs (bench/README.md): see there. JPEG stays with Pillow, whose
# draft decode is the faster floor there.
LIBVIPS_FORMATS = ("WEBP", "PNG")
# Pillow's modes of the images libvips decodes: 8 bits a sample, no palette. 16-bit and
# palette PNGs stay with Pillow's conversions.
LIBVIPS_MODES = ("L", "LA", "RGB", "RGBA")
# The text chunks (by keyword) in which Pillow finds an orientation besides eXIf:
# ImageMagick's raw EXIF profile, and XMP's tiff:Orientation.
_PNG_RAW_EXIF, _PNG_XMP = b"Raw profile type exif", b"XML:com.adobe.xmp"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# Enough for any XMP packet worth reading; a bigger one is not decompressed to look.
_PNG_XMP_LIMIT = 1 << 20
# libwebp decodes to this many times the first thumbnail, and a Lanczos reduce finishes the
# job: libwebp's own scaler alone is a box filter (mean difference to the reference 2.24
# against Pillow's 2.10; at 2x, 2.16). Measured on the mixed corpus's 14 WebPs of 4096x4096:
# at 1.5x the three thumbnails differ from the reference by 3.299 levels against 3.296 at 2x
# (Pillow alone: 3.289), and write_archive takes 244 ms a file against 257 (median of 6).
LIBVIPS_GAP = 1.5
# With `libvips`, the Lanczos resizes of 8-bit images (LIBVIPS_MODES) of at least so many
# pixels and at most so many bytes run in libvips (SIMD) on a copy of the pixels, whoever
# decoded them. Measured,
# CPU per resize, Pillow against libvips: 960x600 RGB to 512x320, 17.6 ms against 5.2 (the
# mixed corpus's baseline JPEG drafts: 18.9 against 7.5, a mean difference of 0.18 levels);
# 512x320 to 256x160, 4.5 against 2.7; 256x160 to 128x80, 1.1 against 1.6, where libvips'
# fixed cost (about 1.3 ms) loses. Larger images stay with Pillow, whose resize needs no copy.
LIBVIPS_RESIZE_MIN_PIXELS = 1 << 17
LIBVIPS_RESIZE_MAX_BYTES = 8 * MiB


class ImageRejected(Exception):
    """The input cannot be turned into thumbnails; the message says why, for a person."""


@dataclass(frozen=True, order=True)
class ThumbnailSize:
    """A bounding box: thumbnails fit inside it, keep their aspect and are never upscaled."""

    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> ThumbnailSize:
        match = _SIZE_PATTERN.match(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a size like 128x128")
        width, height = int(match[1]), int(match[2])
        if not (1 <= width <= MAX_EDGE and 1 <= height <= MAX_EDGE):
            raise ValueError(
                f"{text!r}: each side must be between 1 and {MAX_EDGE} pixels "
                "(larger thumbnails would not fit a worker's memory budget)"
            )
        return cls(width, height)

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size of a width x height image fitted into this box, never upscaled."""
        scale = min(self.width / width, self.height / height, 1.0)
        return max(1, round(width * scale)), max(1, round(height * scale))


def parse_sizes(values: Iterable[str] | str) -> tuple[ThumbnailSize, ...]:
    """Parse "128x128,256x256" or ["128x128", ...] into unique sizes, largest first."""
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, Iterable):
        raise ValueError("sizes must be a list of sizes like 128x128")
    sizes = {ThumbnailSize.parse(value) for value in values if str(value).strip()}
    if len(sizes) > MAX_SIZES:
        raise ValueError(f"at most {MAX_SIZES} sizes, got {len(sizes)}")
    return tuple(sorted(sizes, reverse=True))


@dataclass(frozen=True)
class Limits:
    """What an input may be. Checked before any pixel is decoded."""

    max_pixels: int = 200_000_000
    max_bytes: int = 200 * 1024 * 1024
    # The whole process's memory budget in bytes (None: none). What an image will need is
    # estimated from its header and added to what the process holds already.
    memory_bytes: int | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes an image will hold at once in each stage of write_archive, from its header."""

    decode: int  # the decoded pixels plus the decoder's own buffers
    resize: int  # shrinking the decoded image to the largest thumbnail
    thumbnails: int  # converting, turning and encoding a thumbnail; making the next size

    @property
    def peak(self) -> int:
        return max(self.decode, self.resize, self.thumbnails) + MEMORY_SLACK


@dataclass(frozen=True)
class EncodeOptions:
    """How thumbnails are made and written: the output preset."""

    jpeg_quality: int = 85
    webp_quality: int = 80
    avif_quality: int = 60
    # Thumbnails are small; a high zlib level costs time and saves almost nothing.
    png_compress_level: int = 1
    format: str = "same"  # FORMAT_CHOICES: "same" keeps the input's family
    fit: str = "contain"  # inside the box, aspect kept | "cover": exactly the box, cropped
    gravity: str = "centre"  # where cover crops around: the centre, or the busiest region
    metadata: str = "strip"  # no EXIF/XMP at all | "keep": who, with what, when
    gps: bool = False  # with metadata=keep, keep the GPS block too
    colour: str = "srgb"  # wide-gamut profiles converted to sRGB | "keep" the profile


@dataclass(frozen=True)
class ArchiveInfo:
    """What a finished archive holds, for the records."""

    width: int
    height: int
    format: str
    archive_bytes: int
    members: tuple[str, ...]
    thumbnails: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The format thumbnails were written in, and why any was written in another.
    output_format: str = ""
    notes: tuple[str, ...] = ()


def safe_stem(name: str) -> str:
    """A file-name stem safe for zip members and archive names, whatever the input name.

    Never empty, never starting with a dot, no path separators, at most MAX_STEM_LENGTH
    characters and MAX_STEM_BYTES bytes of UTF-8.
    """
    stem = Path(unicodedata.normalize("NFC", name.replace("\\", "/"))).name
    stem = stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    stem = _UNSAFE_CHARACTERS.sub("_", stem).strip(" ._")
    stem = stem[:MAX_STEM_LENGTH]
    while len(stem.encode()) > MAX_STEM_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(" ._")
    if _WINDOWS_RESERVED.match(stem):
        stem = f"{stem}_"
    return stem or "image"


def open_image(data: bytes | BinaryIO, limits: Limits = Limits()) -> Image.Image:
    """Identify the input as a supported image and check its limits, without decoding pixels.

    `data` is the file's bytes, or a seekable binary file of which only the header is read.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    if not size:
        raise ImageRejected("empty file (0 bytes)")
    if size > limits.max_bytes:
        raise ImageRejected(f"file is {size:,} bytes, over the {limits.max_bytes:,} limit")
    canvas = _webp_canvas(stream.read(30))
    stream.seek(0)
    if canvas is not None and limits.memory_bytes is not None:
        # Pillow's WebP decoder allocates its canvases, and copies the file twice, when the
        # file is opened: check that first. The decode is checked once the image is open
        # (write_archive), by the figure of the decoder that will run: Pillow's needs 17
        # bytes a pixel, the canvases included; libvips' (which frees the canvases first)
        # a fraction of that.
        width, height = canvas
        opening = width * height * WEBP_CANVAS_BYTES + 2 * size
        _check_memory(MemoryEstimate(opening, 0, 0), limits, f"{width}x{height} WEBP")
    try:
        with _pixel_limit(limits.max_pixels):
            image = Image.open(stream, formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(_too_many_pixels(_header_size(stream), limits)) from None
    except UnidentifiedImageError:
        raise ImageRejected(
            f"not an image, or not a supported format (supported: {', '.join(SUPPORTED_FORMATS)})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageRejected(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        image.close()
        raise ImageRejected(_too_many_pixels((width, height), limits))
    return image


def make_thumbnails(
    image: Image.Image,
    sizes: Sequence[ThumbnailSize],
    output_format: str,
    limits: Limits = Limits(),
    options: EncodeOptions = EncodeOptions(),
) -> list[tuple[ThumbnailSize, Image.Image]]:
    """Decode once at the smallest useful scale, shrink largest to smallest, then orient.

    Returns (size, thumbnail) pairs, smallest size first, each thumbnail in a mode the
    output format keeps. The image is decoded even without sizes, so that a broken file
    never passes. Raises ImageRejected when the pixels cannot be decoded. (write_archive
    runs the same cascade but writes each thumbnail away instead of keeping them all.)
    """
    stored_size = image.size
    orientation = _load(image, sizes, limits, options.fit)
    cascade = _thumbnails(
        image, stored_size, orientation, sizes, output_format, options, release=False
    )
    results = [(size, thumbnail) for boxes, thumbnail in cascade for size in boxes]
    return sorted(results, key=lambda pair: pair[0])


def encode(image: Image.Image, output_format: str, options: EncodeOptions) -> bytes:
    """The image as bytes of output_format, with its colour profile if it has one."""
    buffer = io.BytesIO()
    _save(image, buffer, output_format, options)
    return buffer.getvalue()


def output_format_for(input_format: str | None, mode: str = "", requested: str = "same") -> str:
    """The thumbnails' format: the one asked for, else the input's family (see
    OUTPUT_FORMATS); a phone photo with alpha becomes PNG, since JPEG would lose it."""
    if requested != "same":
        return requested.upper()
    if input_format in ("HEIF", "AVIF") and has_alpha(mode):
        return "PNG"
    return OUTPUT_FORMATS.get(input_format or "", "PNG")


def fallback_format(output_format: str, size: tuple[int, int], mode: str) -> str:
    """The format a thumbnail of `size` and `mode` is written in: `output_format` when it
    can hold it, else JPEG, or PNG when there is alpha."""
    if max(size) <= MAX_OUTPUT_EDGE.get(output_format, 1 << 31):
        return output_format
    return "PNG" if mode in ("RGBA", "LA") else "JPEG"


def plan_size(
    box: ThumbnailSize, width: int, height: int, fit: str = "contain"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled, output): the whole width x height image scaled for this box, and the
    thumbnail cut from it. Never upscaled: with cover, a source smaller than the box is
    cropped to the box's aspect at the source's own size."""
    if fit != "cover":
        fitted = box.fit(width, height)
        return fitted, fitted
    scale = min(max(box.width / width, box.height / height), 1.0)
    scaled = max(1, round(width * scale)), max(1, round(height * scale))
    if box.width * height > box.height * width:  # the box is wider: keep the width
        crop = width, max(1, min(height, round(width * box.height / box.width)))
    else:
        crop = max(1, min(width, round(height * box.width / box.height))), height
    if scale < 1.0:
        return scaled, (min(box.width, scaled[0]), min(box.height, scaled[1]))
    return scaled, crop


def write_archive(
    data: bytes,
    original_name: str,
    out: BinaryIO,
    sizes: Sequence[ThumbnailSize],
    *,
    limits: Limits = Limits(),
    options: EncodeOptions = EncodeOptions(),
    libvips: bool = False,
) -> ArchiveInfo:
    """Write a zip of the original (byte for byte) plus one thumbnail per size into `out`.

    `out` is a writable, seekable binary file; where it lives, and how it becomes visible
    only when complete, is the caller's business (see `jobs.storage.atomic_file`). The
    original goes in first, then each thumbnail as soon as it is made, largest first, so
    that only the image the next size is made from is kept. With a memory budget in
    `limits`, an image that would not fit is refused before decoding. Raises ImageRejected
    for bad input, MemoryError when memory ran out all the same (an OS limit, or an image
    the estimate got wrong), and OSError for trouble writing. With `libvips` (and pyvips
    installed), the formats of LIBVIPS_FORMATS are decoded and shrunk to the first thumbnail
    by libvips (see _load_libvips).
    """
    image = open_image(data, limits)
    try:
        input_format = image.format or ""
        output_format = output_format_for(input_format, image.mode, options.format)
        stored_size = image.size
        planned = _libvips_target(image, data, sizes, options) if libvips else None
        if limits.memory_bytes is not None:
            estimate = estimate_memory(image, sizes, data, options, libvips=libvips)
            if planned is not None:
                estimate = _libvips_estimate(image, planned[0], estimate)
            _check_memory(estimate, limits, _describe(image))
        loaded = None
        if planned is not None:
            # Read first: libvips' pixels come back without the metadata. Known before
            # decoding here, since libvips never gets a PNG whose EXIF follows its pixels.
            exif = _kept_exif_before_decoding(image, options)
            loaded = _load_libvips(image, data, planned[0])
        if planned is not None and loaded is not None:
            image, orientation = loaded, planned[1]
        else:
            if planned is not None and limits.memory_bytes is not None:
                # libvips read it otherwise after all: Pillow decodes it, by Pillow's figure.
                estimate = estimate_memory(image, sizes, data, options, libvips=libvips)
                _check_memory(estimate, limits, _describe(image))
            orientation = _load(image, sizes, limits, options.fit)
            exif = _kept_exif(image, options)
    except BaseException:
        image.close()
        raise
    # The cascade owns the image from here and drops it once it is shrunk to the first size,
    # which frees a WebP decoder's canvases too: no other reference to it may stay.
    thumbnails = _thumbnails(
        image,
        stored_size,
        orientation,
        sizes,
        output_format,
        options,
        release=True,
        libvips=libvips,
    )
    del image
    stem = safe_stem(original_name)
    members = [stem + _original_extension(original_name, input_format)]
    made: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    start = out.tell()
    # Images are already compressed: DEFLATE would cost time and save nothing.
    with contextlib.closing(thumbnails), zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(members[0], data)
        for boxes, thumbnail in thumbnails:
            width, height = thumbnail.size
            written = fallback_format(output_format, thumbnail.size, thumbnail.mode)
            if written != output_format:
                notes.append(
                    f"{width}x{height} written as {written}: over {output_format}'s "
                    f"{MAX_OUTPUT_EDGE[output_format]} px limit"
                )
            # Boxes that come to the same size share one member: its name says the size.
            name = f"{stem}_{width}x{height}{EXTENSIONS[written]}"
            if name not in members:
                _write_thumbnail(archive, [name], thumbnail, written, options, exif)
                members.append(name)
            made.update((size.label, thumbnail.size) for size in boxes)
            del thumbnail
    width, height = _rotated(stored_size, orientation)
    return ArchiveInfo(
        width=width,
        height=height,
        format=input_format,
        archive_bytes=out.tell() - start,
        members=tuple(members),
        thumbnails=made,
        output_format=output_format,
        notes=tuple(notes),
    )


def estimate_memory(
    image: Image.Image,
    sizes: Sequence[ThumbnailSize],
    data: bytes = b"",
    options: EncodeOptions = EncodeOptions(),
    *,
    libvips: bool = False,
) -> MemoryEstimate:
    """What write_archive will hold at once, by stage, for this opened, undecoded image,
    beyond what opening it took (a WebP's canvases, allocated by then, are left out).
    With `libvips`, as Pillow decodes it and libvips resizes what it may (_resize).

    From the header only: the size decoded (a JPEG's draft scale), the bytes Pillow keeps
    per pixel of the mode decoded, the decoder's own buffers (a progressive JPEG's
    coefficients, WebP's canvases, a TIFF strip), the modes converted to, and the strips
    and intermediates of the resize. `data` is the file: a JPEG's scans are read from it.
    Measured against the peak resident memory write_archive added in fresh processes
    (VmHWM), on generated 3-20 MP palette, 16-bit and RGBA PNGs, progressive and baseline
    JPEGs and WebPs with sizes up to 3840 px: the largest stage came within 3% of it, above
    or below, and MEMORY_SLACK in `peak` covers the rest (jobs/tests/test_pipeline_memory.py
    checks that in every case).
    """
    stored = image.size
    if image.format in ("JPEG", "MPO"):
        orientation, requested = _jpeg_request(image, sizes, options.fit)
        scale = _draft_scale(stored, requested)
        decoded = (-(-stored[0] // scale), -(-stored[1] // scale))
        orientations: tuple[int, ...] = (orientation,)
    else:
        decoded = stored
        known = _orientation_before_decoding(image)
        # A PNG may keep its EXIF after the pixels: count it either way up.
        orientations = (1, 6) if known is None else (known,)
    pixels = decoded[0] * decoded[1]
    pixel_bytes = _pixel_bytes(image.mode)
    decode = pixels * pixel_bytes + _decoder_bytes(image, decoded, data)
    # What stays until the image is dropped: its pixels. What opening it took, a WebP
    # decoder's canvases and copy of the file, is given back once it is loaded (_load).
    held = pixels * pixel_bytes
    opened = pixels * WEBP_CANVAS_BYTES + len(data) if image.format == "WEBP" else 0
    work_mode = _resizable_mode(image.mode, image.info)
    work_bytes = _pixel_bytes(work_mode)
    converted = pixels * work_bytes if work_mode != image.mode else 0
    premultiplied = work_mode in _PREMULTIPLIED
    output_format = output_format_for(image.format, image.mode, options.format)
    resize = thumbnails = 0
    for orientation in orientations:
        width, height = _rotated(stored, orientation)
        boxes: dict[tuple[int, int], int] = {}
        # Per scaled size, the most pixels of a thumbnail cut from it (cover; with contain,
        # the scaled size itself): what is converted, turned and encoded.
        cuts: dict[tuple[int, int], int] = {}
        for size in set(sizes):
            # With cover, the whole image at the scale it is cropped from (the larger).
            scaled, output = plan_size(size, width, height, options.fit)
            fit = _rotated(scaled, orientation)
            boxes[fit] = boxes.get(fit, 0) + 1
            cuts[fit] = max(cuts.get(fit, 0), output[0] * output[1])
        fits = sorted(boxes, reverse=True)
        if not fits:
            continue
        first = fits[0]
        first_bytes = first[0] * first[1] * work_bytes
        if first == decoded:
            # Nothing to shrink: the first thumbnail is the decoded image, converted (or the
            # image itself, which then stays).
            shrink = held + converted
            first_bytes = converted or held
        elif not _in_strips(image.mode, work_mode, decoded, _reduce_factors(decoded, first)):
            shrink = held + converted + _resize_bytes(decoded, first, work_mode, libvips)
        else:
            factor_x, factor_y = _reduce_factors(decoded, first)
            reduced = (-(-decoded[0] // factor_x), -(-decoded[1] // factor_y))
            if _vertical_first(reduced, first):
                half = reduced[0] * first[1] * work_bytes
                strip = max(1, STRIP_PIXELS // decoded[1] // factor_x) * factor_x * decoded[1]
            else:
                half = first[0] * reduced[1] * work_bytes
                strip = max(1, STRIP_PIXELS // decoded[0] // factor_y) * factor_y * decoded[0]
            # A strip cropped, converted and premultiplied (what it shrinks to is smaller),
            # and the first pass's result so far, while the image is still there; then,
            # the image dropped, that result and the second pass's (premultiplied back).
            strip *= pixel_bytes + work_bytes * (1 + premultiplied)
            shrink = max(held + half + strip, half + first_bytes * (1 + premultiplied))
        resize = max(resize, shrink - opened)
        # Each thumbnail beside the image it is made from (the first: as it came out of the
        # shrink), then that image beside the resize to the next size; the decoded image
        # is gone by then.
        sources = [first_bytes] + [fit[0] * fit[1] * work_bytes for fit in fits[1:]]
        for index, (fit, source) in enumerate(zip(fits, sources, strict=True)):
            cut = cuts[fit]
            work = _thumbnail_work(cut, image.mode, work_mode, output_format, orientation)
            if cut < fit[0] * fit[1]:
                work += cut * work_bytes  # the cut, a copy of its own (_crop)
            if boxes[fit] > 1:
                # Stored under several names: its encoded bytes are kept meanwhile.
                work += cut * 4
            if options.fit == "cover" and options.gravity == "attention":
                # _crop looks for the busiest part on the whole image the cut is made from.
                work = max(work, fit[0] * fit[1] * _attention_bytes(image.mode, work_mode))
            if index + 1 < len(fits):
                work = max(work, _resize_bytes(fit, fits[index + 1], work_mode, libvips))
            thumbnails = max(thumbnails, source + work - opened)
    return MemoryEstimate(decode=decode, resize=resize, thumbnails=thumbnails)


def memory_in_use() -> int:
    """Bytes this process holds against a memory budget; 0 where Linux's /proc is missing.

    Its data (heap and private mappings: what RLIMIT_DATA limits, and never less than its
    anonymous resident memory) plus the file pages it has resident (libraries).
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    held = 0
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmData", "RssFile", "RssShmem"):
            held += int(value.split()[0]) * 1024
    return held


def _check_memory(estimate: MemoryEstimate, limits: Limits, what: str) -> None:
    """Refuse an image whose estimate, with what the process holds, is over the budget."""
    if limits.memory_bytes is None:
        return
    in_use = memory_in_use()
    if in_use + estimate.peak > limits.memory_bytes:
        raise ImageRejected(
            f"decoding needs about {_megabytes(in_use + estimate.peak)} MB "
            f"({_megabytes(estimate.peak)} MB for this {what}, {_megabytes(in_use)} MB held "
            f"by the worker already), over this worker's {_megabytes(limits.memory_bytes)} MB "
            "memory budget (WORKER_MEMORY_MB); refused before decoding"
        )


def _megabytes(value: int) -> int:
    return -(-value // MiB)


def _describe(image: Image.Image) -> str:
    width, height = image.size
    kind = image.format or "image"
    if image.info.get("progressive"):
        kind = f"progressive {kind}"
    return f"{width}x{height} {image.mode} {kind}"


def _load(
    image: Image.Image, sizes: Sequence[ThumbnailSize], limits: Limits, fit: str = "contain"
) -> int:
    """Decode the pixels, a JPEG at the smallest scale that covers the largest thumbnail.

    Returns the EXIF orientation. Raises ImageRejected when the pixels cannot be decoded.
    """
    try:
        if image.format in ("JPEG", "MPO"):
            # The EXIF block comes before the pixels in a JPEG: read it first so that
            # libjpeg can decode at 1/2, 1/4 or 1/8 scale while that still covers the
            # largest thumbnail, in the stored (unrotated) orientation.
            orientation, requested = _jpeg_request(image, sizes, fit)
            image.draft(None, requested)
        with _pixel_limit(limits.max_pixels):
            image.load()
        if image.format in ("WEBP", "AVIF"):
            # Pillow keeps libwebp's animation decoder, and its two canvases of the image's
            # size, to seek to other frames: only the first is ever used. (libavif's too.)
            image.__dict__.pop("_decoder", None)
        if image.format not in ("JPEG", "MPO"):
            # Elsewhere EXIF may follow the pixels (PNG): read it once they are loaded.
            orientation = _orientation(image)
    except _DECODE_ERRORS as exc:
        raise _decode_failure(exc) from None
    return orientation


_PYVIPS: list = []


def _libvips():
    """pyvips, imported on first use (its libraries add about 20 MB to a process); None
    when it is not installed or libvips cannot be loaded: Pillow decodes everything."""
    if not _PYVIPS:
        try:
            import pyvips
        except (ImportError, OSError):
            pyvips = None
        else:
            # A worker runs one image per process: libvips' own threads would only fight the
            # other processes for the cores, and its cache would keep pixels after the image.
            pyvips.concurrency_set(1)
            pyvips.cache_set_max(0)
        _PYVIPS.append(pyvips)
    return _PYVIPS[0]


def warm_up_libvips() -> bool:
    """Load libvips and run its PNG and WebP paths once on tiny images, so that its code is
    resident (about 15 MB of library pages, and 20 MB of data for its threads) before a
    worker measures itself for its memory limit. False when libvips is not there."""
    if _libvips() is None:
        return False
    for image_format in LIBVIPS_FORMATS:
        buffer = io.BytesIO()
        Image.new("RGBA", (64, 64)).save(buffer, image_format)
        with open_image(buffer.getvalue()) as image:
            _load_libvips(image, buffer.getvalue(), (32, 32))
    return True


def _libvips_target(
    image: Image.Image, data: bytes, sizes: Sequence[ThumbnailSize], options: EncodeOptions
) -> tuple[tuple[int, int], int] | None:
    """The size, as stored, that libvips would shrink this opened image to (the whole image
    scaled for the first thumbnail; with cover, at the larger scale, so that the crop is
    covered), and the EXIF orientation. None when libvips is missing or not for this image,
    or there is nothing to shrink."""
    if image.format not in LIBVIPS_FORMATS or image.mode not in LIBVIPS_MODES or not sizes:
        return None
    if "transparency" in image.info:
        return None  # a tRNS colour: Pillow makes it alpha its own way
    orientation = _orientation_before_decoding(image)
    if orientation is None:
        # A PNG with no eXIf before its pixels. Pillow also reads the orientation from an
        # eXIf after them, ImageMagick's raw EXIF profile and XMP, only once decoded (its
        # getexif decodes a PNG first): any of them leaves the PNG to Pillow's way.
        if _png_may_carry_orientation(data):
            return None
        orientation = 1
    if _libvips() is None:
        return None
    width, height = _rotated(image.size, orientation)
    first = max(plan_size(size, width, height, options.fit)[0] for size in sizes)
    target = _rotated(first, orientation)
    if target[0] >= image.width and target[1] >= image.height:
        return None
    return target, orientation


def _png_may_carry_orientation(data: bytes) -> bool:
    """Whether a PNG may hold an orientation Pillow would apply: an eXIf chunk, or a raw
    EXIF profile or XMP whose orientation is not 1, wherever they are. Its chunks are
    walked by their headers, not its bytes searched: a few hundred steps, not a pass over
    the file, and no match by chance in the compressed pixels. (Editors write XMP saying
    orientation 1 into many PNGs: those stay with libvips.)"""
    offset = 8  # the signature
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        body = data[offset + 8 : offset + 8 + length] if kind in _PNG_TEXT_CHUNKS else b""
        if kind == b"eXIf":
            return True
        keyword, _, text = body.partition(b"\0")
        if keyword == _PNG_RAW_EXIF and _raw_exif_orientation(_png_text(kind, text)) != 1:
            return True
        if keyword == _PNG_XMP:
            # Read as Pillow reads it (Image.getexif).
            found = re.search(rb'tiff:Orientation(="|>)([0-9])', _png_text(kind, text))
            if found and int(found[2]) in _TRANSPOSE:
                return True
        if kind == b"IEND":
            break
        offset += 12 + length
    return False


def _raw_exif_orientation(text: bytes) -> int | None:
    """The orientation in ImageMagick's "Raw profile type exif" (a header of three lines,
    then the EXIF in hex, as Pillow reads it); None when it cannot be read."""
    try:
        exif = Image.Exif()
        exif.load(bytes.fromhex("".join(text.decode("latin-1").split("\n")[3:])))
        value = int(exif.get(0x0112, 1))
    except (*_DECODE_ERRORS, OverflowError):
        return None
    return value if value in _TRANSPOSE else 1


def _png_text(kind: bytes, text: bytes) -> bytes:
    """A text chunk's text after its keyword, decompressed when it is (bounded)."""
    if kind == b"zTXt":
        compressed = text[1:]  # the compression method
    elif kind == b"iTXt" and text[:1] == b"\1":
        # Compression flag and method, then the language and translated keyword.
        compressed = text[2:].split(b"\0", 2)[-1]
    elif kind == b"iTXt":
        return text[2:]
    else:
        return text
    try:
        return zlib.decompressobj().decompress(compressed, _PNG_XMP_LIMIT)
    except zlib.error:
        return b""


def _libvips_estimate(
    image: Image.Image, target: tuple[int, int], pillow: MemoryEstimate
) -> MemoryEstimate:
    """What write_archive holds, beyond what opening the image took, when libvips decodes it
    and shrinks it to `target` (see _load_libvips); the thumbnails as Pillow's estimate says.

    A PNG counts whole, in its own bands, and an interlaced one twice: it is decoded whole
    before it streams (measured, 12 MP RGBA: 1.5 times its pixels). A WebP counts at the
    scale libwebp decodes it to, twice (its output and libvips' copy). Then the shrunk image
    three times: premultiplied, resized, and back.
    """
    width, height = image.size
    if image.format == "WEBP":
        scale = min(1.0, LIBVIPS_GAP * max(target[0] / width, target[1] / height))
        decoded = math.ceil(width * scale) * math.ceil(height * scale) * 4 * 2
    else:
        decoded = width * height * len(image.getbands()) * (2 if image.info.get("interlace") else 1)
    shrunk = target[0] * target[1] * 4 * 3
    return MemoryEstimate(decode=decoded + shrunk, resize=0, thumbnails=pillow.thumbnails)


def _load_libvips(image: Image.Image, data: bytes, target: tuple[int, int]) -> Image.Image | None:
    """Decode an identified, checked image with libvips and shrink it to `target` there,
    into a Pillow image; None when libvips reads it otherwise than Pillow would (16 bits,
    another number of bands): then Pillow decodes it, and the image given stays open.

    libvips streams the rows from its decoder through a box shrink and a Lanczos (3 lobes)
    reduce, alpha premultiplied in 8 bits as Pillow does, so that the full-size image never
    exists: WebP is decoded by libwebp straight at LIBVIPS_GAP times the target, PNG by
    libspng. Only the loader of the format Pillow identified ever sees the bytes.

    Returns that image; the Pillow one given is then closed, and a WebP's decoder (its
    canvases) dropped before any pixel is decoded. Memory: _libvips_estimate, checked
    against peaks measured (bench/README.md, jobs/tests/test_pipeline_memory.py).
    """
    pyvips = _libvips()
    loader = pyvips.Image.webpload_buffer if image.format == "WEBP" else pyvips.Image.pngload_buffer
    options: dict[str, object] = {"access": "sequential", "fail_on": "truncated"}
    if image.format == "WEBP":
        ratio = max(target[0] / image.width, target[1] / image.height)
        options["scale"] = min(1.0, LIBVIPS_GAP * ratio)
    try:
        decoded = loader(data, **options)
    except pyvips.Error as exc:
        raise _decode_failure(exc) from None
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(decoded.bands)
    if decoded.format != "uchar" or mode != image.mode:
        return None
    info = {"icc_profile": image.info["icc_profile"]} if "icc_profile" in image.info else {}
    input_format = image.format
    image.close()
    # The loader above only read the header: the pixels stream below. Pillow's WebP decoder,
    # and its two canvases of the full size, go first (as _load drops them).
    image.__dict__.pop("_decoder", None)
    try:
        shrunk = _libvips_lanczos(decoded, target, alpha=mode in _PREMULTIPLIED)
        pixels = shrunk.write_to_memory()
    except pyvips.Error as exc:
        raise _decode_failure(exc) from None
    loaded = Image.frombuffer(mode, (shrunk.width, shrunk.height), pixels, "raw", mode, 0, 1)
    loaded.format = input_format
    loaded.info.update(info)
    return loaded


def _thumbnails(
    image: Image.Image,
    stored_size: tuple[int, int],
    orientation: int,
    sizes: Sequence[ThumbnailSize],
    output_format: str,
    options: EncodeOptions = EncodeOptions(),
    *,
    release: bool,
    libvips: bool = False,
) -> Generator[tuple[list[ThumbnailSize], Image.Image], None, None]:
    """The loaded image's thumbnails, largest first, each made from the one before.

    Yields the boxes that fit the image to one size, with that thumbnail in a mode the
    output format keeps. With `release`, the image is closed and dropped once it is shrunk
    to the first size; the caller then must hold no other reference to it. With `libvips`,
    the resizes it may take run there (_resize).
    """
    width, height = _rotated(stored_size, orientation)
    # (scaled, output) -> boxes: the image is scaled (the cascade), then cut (cover).
    targets: dict[tuple[tuple[int, int], tuple[int, int]], list[ThumbnailSize]] = {}
    for size in sorted(set(sizes), reverse=True):
        targets.setdefault(plan_size(size, width, height, options.fit), []).append(size)
    if not targets:
        return
    # Every side of a scaled size grows with the box's scale, so sorting them sorts both
    # their sides: each size can be made from the one before.
    order = sorted(targets, reverse=True)
    # A HEIC may describe its colour in an nclx box alone (Display P3 from phones): made
    # into the profile it stands for, it is converted or kept as an embedded one would be.
    icc_profile = image.info.get("icc_profile") or nclx_profile(image.info.get("nclx_profile"))
    work_mode = _resizable_mode(image.mode, image.info)
    sixteen_bits = image.mode.startswith("I;16")
    to_rgb = _cmyk_to_rgb(icc_profile) if work_mode == "CMYK" else None
    if work_mode in ("L", "LA") and work_mode not in GREY_MODES[output_format]:
        # Written in colour (WebP, and AVIF with alpha), which a grey profile does not
        # describe: converted through it to sRGB instead, as CMYK is through its own.
        to_rgb = _grey_to_srgb(icc_profile)
        if icc_profile and _profile_space(icc_profile) == "GRAY":
            icc_profile = None  # converted, or (a broken one) left out
    to_srgb = _wide_to_srgb(icc_profile, work_mode) if options.colour == "srgb" else None
    if to_srgb is not None:
        icc_profile = None  # converted: an untagged thumbnail is sRGB to every browser
    oversized = icc_profile is not None and len(icc_profile) > MAX_ICC_BYTES
    if oversized:
        icc_profile = None
    try:
        first = _rotated(order[0][0], orientation)
        half, box = _first_pass(image, first, work_mode, libvips)
        if release:
            if half is not image:
                image.close()
            del image
        source = _second_pass(half, first, box, work_mode)
        del half
        if sixteen_bits:
            source.info["bits"] = 16
        for target in order:
            scaled, output = target
            stored_target = _rotated(scaled, orientation)
            if source.size != stored_target:
                source = _resize(source, stored_target, libvips)
            # Cut before converting, turning and encoding, which then see only the crop.
            thumbnail = _crop(source, _rotated(output, orientation), options.gravity)
            if to_srgb is not None:
                thumbnail = cast(Image.Image, ImageCms.applyTransform(thumbnail, to_srgb))
                thumbnail.info.pop("icc_profile", None)  # sRGB: said by saying nothing
            if oversized:
                thumbnail.info.pop("icc_profile", None)  # resizing copied it
            thumbnail = _output_mode(thumbnail, output_format, to_rgb)
            if orientation in _TRANSPOSE:
                thumbnail = thumbnail.transpose(_TRANSPOSE[orientation])
            if icc_profile and to_rgb is None and _profile_fits(icc_profile, thumbnail):
                thumbnail.info["icc_profile"] = icc_profile
            yield targets[target], thumbnail
            del thumbnail
    except _DECODE_ERRORS as exc:
        raise _decode_failure(exc) from None


def _first_pass(
    image: Image.Image, target: tuple[int, int], work_mode: str, libvips: bool = False
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """First half of shrinking the decoded image to `target`: the pass Pillow runs first.

    Returns that pass's result and the box the second pass reads from it. A large image
    that needs converting, premultiplying or reducing goes through the first pass in strips
    (of rows for the horizontal pass, of columns for the vertical one), so that none of
    those copies is ever made of the whole image. The result is the one Pillow's resize
    gives (reduce by whole factors while `REDUCING_GAP` allows, then Lanczos in two
    passes), since each step works on rows or columns independently. Anything else is
    shrunk in one go (_resize): strips would only add copies.
    """
    width, height = image.size
    if image.size == target:
        return _resizable(image), (0, 0, *target)
    factors = factor_x, factor_y = _reduce_factors(image.size, target)
    if not _in_strips(image.mode, work_mode, image.size, factors):
        return _resize(_resizable(image), target, libvips), (0, 0, *target)
    resample_mode = _PREMULTIPLIED.get(work_mode, work_mode)
    reduced = (-(-width // factor_x), -(-height // factor_y))
    box_width, box_height = width / factor_x, height / factor_y
    if _vertical_first(reduced, target):
        step = max(1, STRIP_PIXELS // height // factor_x) * factor_x
        half = Image.new(resample_mode, (reduced[0], target[1]))
        for left in range(0, width, step):
            box = (left, 0, min(width, left + step), height)
            strip = _strip(image, box, factors, work_mode, resample_mode)
            strip = strip.resize(
                (strip.width, target[1]),
                Image.Resampling.LANCZOS,
                box=(0, 0, strip.width, box_height),
            )
            half.paste(strip, (left // factor_x, 0))
        return half, (0, 0, box_width, target[1])
    step = max(1, STRIP_PIXELS // width // factor_y) * factor_y
    half = Image.new(resample_mode, (target[0], reduced[1]))
    for top in range(0, height, step):
        box = (0, top, width, min(height, top + step))
        strip = _strip(image, box, factors, work_mode, resample_mode)
        strip = strip.resize(
            (target[0], strip.height), Image.Resampling.LANCZOS, box=(0, 0, box_width, strip.height)
        )
        half.paste(strip, (0, top // factor_y))
    return half, (0, 0, target[0], box_height)


def _resize(image: Image.Image, target: tuple[int, int], libvips: bool) -> Image.Image:
    """Lanczos (3 lobes) to `target`, reducing by whole factors first while REDUCING_GAP
    allows: Pillow's resize, or with `libvips` the same steps in libvips for an 8-bit image
    of a size where that wins (LIBVIPS_RESIZE_MIN_PIXELS), alpha premultiplied in 8 bits
    as Pillow does. Pillow's resize stands in wherever libvips fails: the pixels, decoded
    already, are good."""
    if libvips and _libvips_resizes(image.size, image.mode):
        pyvips = _libvips()
        try:
            pixels = pyvips.Image.new_from_memory(
                image.tobytes(), image.width, image.height, len(image.getbands()), "uchar"
            )
            shrunk = _libvips_lanczos(pixels, target, alpha=image.mode in _PREMULTIPLIED)
            # libvips rounds its output size from the scale: never seen off, but the size
            # is the contract.
            if (shrunk.width, shrunk.height) == target:
                resized = Image.frombuffer(
                    image.mode, target, shrunk.write_to_memory(), "raw", image.mode, 0, 1
                )
                resized.info.update(image.info)
                return resized
        except pyvips.Error:
            pass
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def _libvips_lanczos(pixels, target: tuple[int, int], *, alpha: bool):
    """libvips' steps for Pillow's resize of 8-bit `pixels` to `target`: reduce by whole
    factors while REDUCING_GAP allows, then Lanczos (3 lobes); with `alpha`, premultiplied
    in 8 bits and rounded as Pillow rounds it (measured on gradients: 0.06 levels from
    Pillow's resize, where truncating gave 0.5). Lazy: the pixels flow once it is written."""
    if alpha:
        pixels = pixels.premultiply().rint().cast("uchar")
    shrunk = pixels.resize(
        target[0] / pixels.width,
        vscale=target[1] / pixels.height,
        kernel="lanczos3",
        gap=REDUCING_GAP,
    )
    return shrunk.unpremultiply().cast("uchar") if alpha else shrunk


def _libvips_resizes(size: tuple[int, int], mode: str) -> bool:
    """Whether _resize hands an image of this size and mode to libvips (when asked to)."""
    pixels = size[0] * size[1]
    if mode not in LIBVIPS_MODES or pixels < LIBVIPS_RESIZE_MIN_PIXELS:
        return False
    if pixels * len(mode) > LIBVIPS_RESIZE_MAX_BYTES:
        return False
    return _libvips() is not None


def _second_pass(
    half: Image.Image,
    target: tuple[int, int],
    box: tuple[float, float, float, float],
    work_mode: str,
) -> Image.Image:
    """Second half: the other pass, back in the mode thumbnails are made in."""
    if half.size != target or box != (0, 0, *target):
        half = half.resize(target, Image.Resampling.LANCZOS, box=box)
    return half if half.mode == work_mode else half.convert(work_mode)


def _strip(
    image: Image.Image,
    box: tuple[int, int, int, int],
    factors: tuple[int, int],
    work_mode: str,
    resample_mode: str,
) -> Image.Image:
    """A strip of the decoded image, in the mode it is resampled in, reduced by `factors`."""
    if image.mode == resample_mode:
        return image.reduce(factors, box=box)
    strip = image.crop(box)
    for mode in (work_mode, resample_mode):
        if strip.mode != mode:
            strip = strip.convert(mode)
    return strip.reduce(factors) if factors != (1, 1) else strip


def _vertical_first(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether Pillow's Lanczos resize of `size` to `target` runs its vertical pass first.

    Pillow 13 does when the height shrinks by more than twice as many pixels as the width
    (libImaging/Resample.c); the strips follow it so that the result stays Pillow's own.
    """
    taller_by = size[1] - target[1]
    return taller_by > 0 and taller_by > 2 * (size[0] - target[0])


def _in_strips(mode: str, work_mode: str, size: tuple[int, int], factors: tuple[int, int]) -> bool:
    """Whether a decoded image is shrunk strip by strip rather than by Pillow in one go.

    Strips save memory where Pillow would copy the whole image: to convert it, to
    premultiply its alpha, to reduce it. Otherwise they cost time (measured: 5% more CPU
    for a 24 MP RGB JPEG or a 48 MP RGB PNG into 3840 px, copying each strip out) and save
    only the result.
    """
    if size[0] * size[1] <= STRIP_PIXELS:
        return False
    return mode != work_mode or work_mode in _PREMULTIPLIED or factors != (1, 1)


def _resize_bytes(
    size: tuple[int, int], target: tuple[int, int], mode: str, libvips: bool = False
) -> int:
    """What Pillow's resize(target, LANCZOS, reducing_gap) holds beside its source: a
    premultiplied copy, the reduced image, the rows of its horizontal pass, the result.
    With `libvips`, when _resize would hand the image to libvips, its copy of the pixels
    as well (libvips' own rows are fewer than Pillow's)."""
    pixel_bytes = _pixel_bytes(mode)
    if libvips and _libvips_resizes(size, mode):
        return size[0] * size[1] * len(mode) + _resize_bytes(size, target, mode)
    premultiplied = mode in _PREMULTIPLIED
    factor_x, factor_y = _reduce_factors(size, target)
    reduced = 0
    if (factor_x, factor_y) != (1, 1):
        reduced = -(-size[0] // factor_x) * -(-size[1] // factor_y) * pixel_bytes
    rows = target[0] * -(-size[1] // factor_y) * pixel_bytes
    result = target[0] * target[1] * pixel_bytes
    return premultiplied * size[0] * size[1] * pixel_bytes + reduced + rows + result


def _reduce_factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The whole factors Pillow's resize reduces by first, for this `REDUCING_GAP`."""
    return (
        int(size[0] / target[0] / REDUCING_GAP) or 1,
        int(size[1] / target[1] / REDUCING_GAP) or 1,
    )


def _write_thumbnail(
    archive: zipfile.ZipFile,
    names: list[str],
    thumbnail: Image.Image,
    output_format: str,
    options: EncodeOptions,
    exif: bytes = b"",
) -> None:
    """Encode a thumbnail into the zip under each of its names, without keeping the bytes
    when there is one name (boxes that fit the image to the same size share them)."""
    try:
        if len(names) == 1:
            with archive.open(_member(names[0]), "w") as member:
                _save(thumbnail, member, output_format, options, exif)
            return
        payload = encode(thumbnail, output_format, options)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # writing failed (a full disk), not encoding
        raise ImageRejected(f"cannot encode thumbnail: {exc}") from None
    for name in names:
        archive.writestr(_member(name), payload)


def _member(name: str) -> zipfile.ZipInfo:
    """A stored zip member dated now, readable by its owner: what writestr(name) makes."""
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    return info


def _save(
    image: Image.Image,
    out: IO[bytes],
    output_format: str,
    options: EncodeOptions,
    exif: bytes = b"",
) -> None:
    # Nothing of the source's metadata rides along: Pillow's encoders read XMP, comments
    # and the like from info, which resizing copies. What is kept is passed explicitly.
    info = image.info
    image.info = {"icc_profile": info["icc_profile"]} if "icc_profile" in info else {}
    extra: dict[str, object] = {str(key): value for key, value in image.info.items()}
    if exif:
        extra["exif"] = exif
    try:
        if output_format == "JPEG":
            image.save(out, "JPEG", quality=options.jpeg_quality, **extra)
        elif output_format == "WEBP":
            # method 2 encodes a 512 px thumbnail 3x faster than 4, for files about 10% larger.
            image.save(out, "WEBP", quality=options.webp_quality, method=2, **extra)
        elif output_format == "AVIF":
            image.save(out, "AVIF", quality=options.avif_quality, speed=8, **extra)
        else:
            # zlib's run-length strategy after PNG's row filters: measured on the mixed
            # corpus's 123 PNG thumbnails, 14% smaller and 5-8% faster than the default.
            image.save(
                out,
                "PNG",
                compress_level=options.png_compress_level,
                compress_type=zlib.Z_RLE,
                **extra,
            )
    finally:
        image.info = info


def _crop(image: Image.Image, size: tuple[int, int], gravity: str) -> Image.Image:
    """`size` cut out of the image: around its centre, or with gravity=attention around
    the stretch with the most edges (measured on this small image, along the one axis
    that is cut)."""
    if image.size == size:
        return image
    spare_x, spare_y = image.width - size[0], image.height - size[1]
    left, top = spare_x // 2, spare_y // 2
    if gravity == "attention" and (spare_x or spare_y):
        grey = _to_8_bits(image) if image.mode in ("I", "F") else image.convert("L")
        edges = grey.filter(ImageFilter.FIND_EDGES)
        if spare_x:
            left = _busiest(edges.resize((image.width, 1), Image.Resampling.BOX), size[0])
        if spare_y:
            column = edges.resize((1, image.height), Image.Resampling.BOX)
            top = _busiest(column.transpose(Image.Transpose.TRANSPOSE), size[1])
    return image.crop((left, top, left + size[0], top + size[1]))


def _busiest(profile: Image.Image, length: int) -> int:
    """Where a window of `length` over a one-row image holds the largest sum."""
    values = list(profile.tobytes())  # an L image: one byte a pixel
    window = best = sum(values[:length])
    start = 0
    for index in range(length, len(values)):
        window += values[index] - values[index - length]
        if window > best:
            best, start = window, index - length + 1
    return start


def _kept_exif(image: Image.Image, options: EncodeOptions) -> bytes:
    """The EXIF thumbnails carry: none when stripped; with metadata=keep, who made the
    image, with what and when, GPS only with gps=keep, never the orientation (applied)."""
    if options.metadata != "keep":
        return b""
    try:
        source = image.getexif()
        # Pillow reads EXIF text as Latin-1 and writes a str back as ASCII, "?" for anything
        # else (a copyright's "©", UTF-8 names): these tags go back as the bytes they were,
        # which Pillow writes as they are, typed ASCII.
        top = {tag: _exif_text_bytes(source[tag]) for tag in KEPT_EXIF_TAGS if tag in source}
        details = source.get_ifd(_EXIF_IFD)
        ifds = {_EXIF_IFD: {tag: details[tag] for tag in KEPT_EXIF_IFD_TAGS if tag in details}}
        if options.gps:
            ifds[_GPS_IFD] = dict(source.get_ifd(_GPS_IFD))
        # Longest last: the first to go when the block would be over MAX_EXIF_BYTES.
        values = [(top, tag) for tag in top]
        values += [(ifd, tag) for ifd in ifds.values() for tag in ifd]
        values.sort(key=lambda place: len(repr(place[0][place[1]])))
        while True:
            kept = Image.Exif()
            kept.update(top)
            kept.update((tag, ifd) for tag, ifd in ifds.items() if ifd)
            block = kept.tobytes() if len(kept) else b""
            if len(block) <= MAX_EXIF_BYTES:
                return block
            values_of, tag = values.pop()
            del values_of[tag]
    except _DECODE_ERRORS:
        return b""  # broken EXIF is no reason to refuse the image, and none is kept


def _exif_text_bytes(value: object) -> object:
    """An EXIF value as Pillow read it, text back into its bytes (Pillow decodes them as
    Latin-1, which every byte survives)."""
    return value.encode("latin-1") if isinstance(value, str) else value


def _kept_exif_before_decoding(image: Image.Image, options: EncodeOptions) -> bytes:
    """_kept_exif, without decoding: a PNG with no EXIF before its pixels has none kept
    (Pillow's getexif would decode the whole image to look after them)."""
    if image.format == "PNG" and "exif" not in image.info:
        return b""
    return _kept_exif(image, options)


def _decode_failure(exc: BaseException) -> Exception:
    """What a decoder's error means: a codec out of memory, or a broken file."""
    # Pillow's libtiff path gives its codec's status by number: -9 is IMAGING_CODEC_MEMORY.
    if "out of memory" in str(exc) or str(exc) == "decoder error -9":
        return MemoryError(str(exc))
    return ImageRejected(f"cannot decode image (truncated or corrupt): {exc}")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's own bomb check say what our Limits say, for the time of one call.

    Pillow's limit is process-global and only warns between 1x and 2x of it, so it is set
    to ours and its warning raised as an error, then both are put back. Celery's prefork
    workers handle one image per process at a time, so this does not race.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _too_many_pixels(size: tuple[int, int] | None, limits: Limits) -> str:
    if size is None:
        return f"image refused before decoding: over the {limits.max_pixels:,} pixel limit"
    width, height = size
    return (
        f"image is {width}x{height} ({width * height:,} pixels), "
        f"over the {limits.max_pixels:,} pixel limit; refused before decoding"
    )


def _header_size(stream: BinaryIO) -> tuple[int, int] | None:
    """The size an image header claims, for a message, without Pillow's limit in the way."""
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(stream, formats=SUPPORTED_FORMATS) as image:
            return image.size
    except _DECODE_ERRORS:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 to 8; 1 (as stored) when absent or nonsense.

    An EXIF block Pillow cannot parse (not TIFF inside, cut short) is nonsense too: the
    pixels may still be good, and this runs before any decoding.
    """
    try:
        value = int(image.getexif().get(0x0112, 1))
    except (*_DECODE_ERRORS, OverflowError):
        return 1
    return value if value in _TRANSPOSE else 1


def _rotated(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Swap width and height when the orientation turns the image by 90 degrees."""
    return (size[1], size[0]) if orientation in _ROTATING_ORIENTATIONS else size


def _resizable(image: Image.Image) -> Image.Image:
    """The decoded image in a mode Pillow resamples well, converting only when it must."""
    mode = _resizable_mode(image.mode, image.info)
    if mode == image.mode:
        return image
    converted = image.convert(mode)
    if image.mode.startswith("I;16"):
        converted.info["bits"] = 16
    return converted


def _resizable_mode(mode: str, info: dict) -> str:
    """The mode an image of `mode` is resized in (see _RESIZABLE_MODES)."""
    if mode in ("1", "L", "RGB") and info.get("transparency") is not None:
        return "RGBA" if mode == "RGB" else "LA"  # a tRNS colour key: made alpha
    if mode in _RESIZABLE_MODES:
        return mode
    if mode in ("P", "PA"):
        return "RGBA" if mode == "PA" or "transparency" in info else "RGB"
    if mode == "1":
        return "L"
    if mode == "La":
        return "LA"
    if mode.startswith("I;16"):
        return "I"
    return "RGBA" if has_alpha(mode) else "RGB"


def has_alpha(mode: str) -> bool:
    """Whether a Pillow mode carries alpha: its last band, A or a (premultiplied). Not any
    A in its name: LAB's A is a colour axis."""
    return mode.endswith(("A", "a"))


def _pixel_bytes(mode: str) -> int:
    """Bytes Pillow keeps per pixel: one for 1, L and P, two for 16-bit grey, else four
    (RGB, LA and the like are padded to four)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _decoder_bytes(image: Image.Image, decoded: tuple[int, int], data: bytes) -> int:
    """What a decoder holds beside the decoded pixels, at its peak."""
    width, height = decoded
    if image.format in ("JPEG", "MPO"):
        return _jpeg_coefficient_bytes(image, data)
    if image.format == "WEBP":
        # Beyond the canvases, which opening the file allocated: the frame's bytes, and
        # the file, which the decoder keeps a copy of.
        return width * height * (WEBP_DECODER_BYTES - WEBP_CANVAS_BYTES) + len(data)
    if image.format == "TIFF":
        # libtiff reads a strip, or a tile, into a buffer of its own, and a file may well
        # hold the whole image in one strip. A tile is its own size, whatever the image's:
        # measured, a 16x16 TIFF in one deflated 8192x8192 tile (195 KB) held 192 MB.
        tags = image.tag_v2  # type: ignore[attr-defined]
        samples = tags.get(277) or 1
        bits = max(tags.get(258) or (8,))
        pixel_bytes = max(4, samples * -(-bits // 8))
        if tags.get(322) and tags.get(323):
            return tags[322] * tags[323] * pixel_bytes
        rows = tags.get(278) or height
        return min(rows, height) * width * pixel_bytes
    if image.format == "HEIF":
        return width * height * HEIF_DECODER_BYTES + len(data)
    if image.format == "AVIF":
        return width * height * AVIF_DECODER_BYTES + len(data)
    if image.format == "BMP" and image.info.get("compression") in (1, 2):
        # Run-length BMPs are decoded in Python, into a bytearray and then a bytes copy.
        return 2 * width * height
    return 0


def _jpeg_request(
    image: Image.Image, sizes: Sequence[ThumbnailSize], fit: str = "contain"
) -> tuple[int, tuple[int, int]]:
    """A JPEG's EXIF orientation, and the stored size its draft must still cover: the
    whole image as scaled for each box (with cover, the larger scale it is cut from)."""
    orientation = _orientation(image)
    width, height = _rotated(image.size, orientation)
    largest = max((plan_size(size, width, height, fit)[0] for size in sizes), default=(1, 1))
    return orientation, _rotated(largest, orientation)


def _draft_scale(size: tuple[int, int], requested: tuple[int, int]) -> int:
    """The scale, 1, 2, 4 or 8, that Pillow's JPEG draft(None, requested) decodes at."""
    scale = min(size[0] // requested[0], size[1] // requested[1])
    return next((step for step in (8, 4, 2) if scale >= step), 1)


def _jpeg_coefficient_bytes(image: Image.Image, data: bytes) -> int:
    """The DCT coefficients libjpeg keeps for the whole image when the scans are several.

    A progressive JPEG (or a sequential one whose first scan holds fewer components than
    the frame) is decoded scan by scan, into a buffer of every block's 64 coefficients, 2
    bytes each: about 2 bytes per sample of the full-size image, whatever the draft scale.
    Measured: a 10000x10000 4:2:0 progressive JPEG drafted to 1/2 peaks at 381 MiB, its
    95 MiB of pixels plus 286 MiB (300 MB) of coefficients.
    """
    layers = image.layer  # type: ignore[attr-defined]
    if not layers:
        return 0
    scans = _jpeg_first_scan_components(data)
    if not image.info.get("progressive") and scans == len(layers):
        return 0
    width, height = image.size
    most_h = max(layer[1] for layer in layers) or 1
    most_v = max(layer[2] for layer in layers) or 1
    total = 0
    for _, h, v, _ in layers:
        # As libjpeg sizes them: blocks of 8x8 samples, padded to whole MCUs.
        columns = -(-width * h // (most_h * 8))
        rows = -(-height * v // (most_v * 8))
        total += -(-columns // max(h, 1)) * max(h, 1) * -(-rows // max(v, 1)) * max(v, 1) * 128
    return total


def _jpeg_first_scan_components(data: bytes) -> int | None:
    """How many components a JPEG's first scan (SOS) holds; None when it cannot be found."""
    position = 2
    while position + 4 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            position += 2
        elif marker == 0xDA:
            return data[position + 4]
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first chunk; None for anything else."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        return width, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _orientation_before_decoding(image: Image.Image) -> int | None:
    """The EXIF orientation where it is known before decoding; None for a PNG without it."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return _orientation(image)


def _thumbnail_work(
    pixels: int, mode: str, work_mode: str, output_format: str, orientation: int
) -> int:
    """What a thumbnail of `pixels` holds beside the image it was made from: its conversion
    to the output's mode, then the converted image, its turned copy and its encoder."""
    output_bytes = 1 if work_mode in ("L", "I", "F") else 4
    if work_mode == "CMYK":
        converting = 4
    elif work_mode in ("I", "F"):
        # Scaled to 8 bits: 16-bit grey through one 32-bit copy, others through two; then L.
        converting = 5 if mode.startswith("I;16") else 9
    elif work_mode in _PREMULTIPLIED and output_format == "JPEG":
        converting = 16  # laid on white: a background, two RGBA copies, the RGB result
    elif work_mode in ("L", "LA") and work_mode not in GREY_MODES[output_format]:
        # Through a grey profile to sRGB: the grey channel, then RGB(A).
        converting, output_bytes = 5, 4
    else:
        converting = output_bytes = 0  # the thumbnail is the image it was made from
    turned = (output_bytes or _pixel_bytes(work_mode)) if orientation in _TRANSPOSE else 0
    encoder = 0
    if output_format == "WEBP":
        # libwebp encodes from pictures of its own (ARGB, then YUV) and returns the bytes;
        # an alpha plane is compressed losslessly, at a far higher cost. Measured, 3840 px
        # square: 5.6 bytes per pixel for RGB, 19.3 for RGBA.
        encoder = 20 if work_mode in _PREMULTIPLIED else 6
    elif output_format == "AVIF":
        encoder = AVIF_ENCODER_BYTES
    return pixels * max(converting, output_bytes + turned + encoder)


def _attention_bytes(mode: str, work_mode: str) -> int:
    """What _crop's search for the busiest part holds per pixel of the image it cuts: that
    image in grey (through _to_8_bits' copies for 32-bit and float), and its edges."""
    if work_mode in ("I", "F"):
        return (5 if mode.startswith("I;16") else 9) + 1
    return 2


def _output_mode(
    image: Image.Image, output_format: str, to_rgb: ImageCms.ImageCmsTransform | None
) -> Image.Image:
    """A thumbnail in a mode the output format keeps: 8 bits, RGB(A) or L(A)."""
    mode = image.mode
    if mode == "CMYK":
        if to_rgb is None:
            return image.convert("RGB")
        return cast(Image.Image, ImageCms.applyTransform(image, to_rgb))
    if mode in ("L", "LA") and to_rgb is not None:
        coloured = cast(Image.Image, ImageCms.applyTransform(image.convert("L"), to_rgb))
        coloured.info.pop("icc_profile", None)  # sRGB: said by saying nothing
        if mode == "LA":
            coloured.putalpha(image.getchannel("A"))
        return coloured
    if mode in ("I", "F"):
        return _to_8_bits(image)
    if mode in ("RGBA", "LA") and output_format == "JPEG":
        # JPEG has no alpha: lay the image on white, as a viewer would show it.
        background = Image.new(mode, image.size, (255, 255, 255, 255)[: len(mode)])
        return Image.alpha_composite(background.convert("RGBA"), image.convert("RGBA")).convert(
            "RGB" if mode == "RGBA" else "L"
        )
    return image


def _to_8_bits(image: Image.Image) -> Image.Image:
    """Scale 32-bit (or 16-bit made 32) or float greyscale into L, instead of clipping it."""
    if image.info.get("bits") == 16:
        return image.point(lambda value: value / 256).convert("L")
    low, high = cast(tuple[float, float], image.getextrema())  # one band: I or F
    if image.mode == "F" and low >= 0 and high <= 1:
        return image.point(lambda value: value * 255).convert("L")
    if low >= 0 and high <= 255:
        return image.convert("L")
    if low >= 0 and high <= 65535:
        return image.convert("I").point(lambda value: value / 256).convert("L")
    # Unknown range: stretch what is there over 0-255.
    scale = 255 / (high - low) if high > low else 0
    return image.convert("F").point(lambda value: (value - low) * scale).convert("L")


def _cmyk_to_rgb(icc_profile: bytes | None) -> ImageCms.ImageCmsTransform | None:
    """A CMYK to sRGB transform through the image's own profile, or None to convert naively."""
    if not icc_profile or _profile_space(icc_profile) != "CMYK":
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.buildTransform(source, _srgb_profile(), "CMYK", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        # A broken profile is no reason to refuse the image: fall back to the plain formula.
        return None


def _grey_to_srgb(icc_profile: bytes | None) -> ImageCms.ImageCmsTransform | None:
    """A transform from a grey profile to sRGB, for grey thumbnails written in colour; None
    without one (grey values untagged are sRGB's already)."""
    if not icc_profile or _profile_space(icc_profile) != "GRAY":
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.buildTransform(
            source, _srgb_profile(), "L", "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a broken profile: the grey values go out as they are, untagged


def _wide_to_srgb(icc_profile: bytes | None, work_mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from an RGB profile other than sRGB (Display P3, Adobe RGB, ...) to
    sRGB, for thumbnails in the work mode; None when there is nothing to convert."""
    if not icc_profile or work_mode not in ("RGB", "RGBA") or _profile_space(icc_profile) != "RGB":
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if not _wider_than_srgb(source):
            return None  # sRGB, or a profile without primaries: kept as it is, as before
        return ImageCms.buildTransform(
            source, _srgb_profile(), work_mode, work_mode, ImageCms.Intent.RELATIVE_COLORIMETRIC
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a broken profile: the pixels go out as they are, with it


# How far (in xy chromaticity) a primary may lie from sRGB's and still count as sRGB:
# profiles that say sRGB differ by a few thousandths; Display P3's red is 0.034 away,
# Adobe RGB's green 0.10.
SRGB_PRIMARY_TOLERANCE = 0.01


def _wider_than_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """Whether a matrix/TRC RGB profile's primaries are other than sRGB's (Display P3, Adobe
    RGB, ProPhoto). A LUT-based profile has none to compare: it is left to the viewer."""
    ours, theirs = _srgb_profile().profile, profile.profile
    for name in ("red_colorant", "green_colorant", "blue_colorant"):
        primary, reference = getattr(theirs, name), getattr(ours, name)
        if primary is None:
            return False
        if math.dist(primary[1][:2], reference[1][:2]) > SRGB_PRIMARY_TOLERANCE:
            return True
    return False


_SRGB: list[ImageCms.ImageCmsProfile] = []


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    if not _SRGB:
        _SRGB.append(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")))
    return _SRGB[0]


def _profile_space(icc_profile: bytes) -> str:
    return icc_profile[16:20].decode("latin-1").strip() if len(icc_profile) >= 128 else ""


def _profile_fits(icc_profile: bytes, image: Image.Image) -> bool:
    """True when the profile describes the image's colour space (RGB or grey)."""
    space = _profile_space(icc_profile)
    return (space == "RGB" and image.mode in ("RGB", "RGBA")) or (
        space == "GRAY" and image.mode in ("L", "LA")
    )


def _original_extension(name: str, input_format: str) -> str:
    """The name's own extension when it matches the content, else the format's usual one."""
    suffix = Path(name.replace("\\", "/")).suffix.lower()
    known = ORIGINAL_EXTENSIONS.get(input_format, ())
    if suffix in known:
        return suffix
    return known[0] if known else ".bin"

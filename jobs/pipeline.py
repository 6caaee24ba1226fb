"""Pure image work: validate, orient, thumbnail, encode, and pack the zip.

No Django, no Celery, no settings: every function takes what it needs as arguments, so it
can be tested on pixels and benchmarked on its own.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import unicodedata
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats Pillow may open: an allow-list, so that no other decoder (EPS/Ghostscript, PSD,
# ...) ever sees untrusted bytes.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP")
# Thumbnails keep the input's family: lossy stays JPEG/WebP, everything else becomes PNG.
OUTPUT_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
MAX_SIZES = 20
MAX_EDGE = 10_000
MAX_STEM_LENGTH = 100

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_UNSAFE_CHARACTERS = re.compile(r"[^\w.\- ]+")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


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
            raise ValueError(f"{text!r}: each side must be between 1 and {MAX_EDGE} pixels")
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


@dataclass(frozen=True)
class EncodeOptions:
    jpeg_quality: int = 85
    webp_quality: int = 80
    # Thumbnails are small; a high zlib level costs time and saves almost nothing.
    png_compress_level: int = 1


@dataclass(frozen=True)
class ArchiveInfo:
    """What a finished archive holds, for the records."""

    width: int
    height: int
    format: str
    archive_bytes: int
    members: tuple[str, ...]
    thumbnails: dict[str, tuple[int, int]] = field(default_factory=dict)


def safe_stem(name: str) -> str:
    """A file-name stem safe for zip members and archive names, whatever the input name."""
    stem = Path(unicodedata.normalize("NFC", name.replace("\\", "/"))).name
    stem = stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    stem = _UNSAFE_CHARACTERS.sub("_", stem).strip(" ._")
    return stem[:MAX_STEM_LENGTH].rstrip(" ._") or "image"


def open_image(data: bytes, limits: Limits = Limits()) -> Image.Image:  # noqa: B008
    """Identify the bytes as a supported image and check its limits, without decoding pixels."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"file is {len(data):,} bytes, over the {limits.max_bytes:,} limit")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit: that is still a bomb here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
        try:
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"image refused before decoding: {exc}") from None
        except UnidentifiedImageError:
            raise ImageRejected(
                "not an image, or not a supported format "
                f"(supported: {', '.join(sorted(set(SUPPORTED_FORMATS) - {'MPO'}))})"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageRejected(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} ({width * height:,} pixels), "
            f"over the {limits.max_pixels:,} pixel limit"
        )
    return image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """The image's size as a person sees it, after its EXIF orientation."""
    width, height = image.size
    if _orientation(image) in _ROTATING_ORIENTATIONS:
        return height, width
    return width, height


def make_thumbnails(
    image: Image.Image, sizes: Sequence[ThumbnailSize], output_format: str
) -> list[tuple[ThumbnailSize, Image.Image]]:
    """Decode once at the smallest useful scale, orient, then shrink largest to smallest."""
    if not sizes:
        return []
    sizes = sorted(sizes, reverse=True)
    width, height = oriented_size(image)
    largest_fit = max((size.fit(width, height) for size in sizes), key=lambda wh: wh[0] * wh[1])
    rotated = _orientation(image) in _ROTATING_ORIENTATIONS
    draft_box = (largest_fit[1], largest_fit[0]) if rotated else largest_fit
    if image.format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the largest box.
        image.draft(None, draft_box)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"cannot decode image (truncated or corrupt): {exc}") from None
    working = _to_output_mode(ImageOps.exif_transpose(image) or image, output_format)
    results: list[tuple[ThumbnailSize, Image.Image]] = []
    source = working
    for size in sizes:
        target = size.fit(width, height)
        if source.size == target:
            thumbnail = source.copy()
        else:
            thumbnail = source.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        results.append((size, thumbnail))
        # Each smaller size starts from the last one: fewer pixels to read, same quality.
        source = thumbnail
    results.sort(key=lambda pair: pair[0])
    return results


def encode(image: Image.Image, output_format: str, options: EncodeOptions) -> bytes:
    buffer = io.BytesIO()
    if output_format == "JPEG":
        image.save(buffer, "JPEG", quality=options.jpeg_quality)
    elif output_format == "WEBP":
        image.save(buffer, "WEBP", quality=options.webp_quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=options.png_compress_level)
    return buffer.getvalue()


def output_format_for(input_format: str | None) -> str:
    return OUTPUT_FORMATS.get(input_format or "", "PNG")


def build_archive(
    data: bytes,
    original_name: str,
    destination: Path,
    sizes: Sequence[ThumbnailSize],
    *,
    limits: Limits = Limits(),  # noqa: B008
    options: EncodeOptions = EncodeOptions(),  # noqa: B008
) -> ArchiveInfo:
    """Write a zip of the original (byte for byte) plus one thumbnail per size.

    The zip appears at `destination` only complete: it is written under a temporary name
    in the same folder, fsynced, then renamed. Raises ImageRejected for bad input and
    OSError for trouble writing (a full disk, say); no temporary file survives either.
    """
    image = open_image(data, limits)
    with image:
        input_format = image.format or ""
        width, height = oriented_size(image)
        output_format = output_format_for(input_format)
        thumbnails = make_thumbnails(image, sizes, output_format)
    stem = safe_stem(original_name)
    original_member = stem + _original_extension(original_name, input_format)
    members = [original_member]
    payloads = [data]
    for size, thumbnail in thumbnails:
        members.append(f"{stem}_{size.label}{EXTENSIONS[output_format]}")
        payloads.append(encode(thumbnail, output_format, options))
    archive_bytes = write_zip_atomically(destination, zip(members, payloads, strict=True))
    return ArchiveInfo(
        width=width,
        height=height,
        format=input_format,
        archive_bytes=archive_bytes,
        members=tuple(members),
        thumbnails={size.label: thumbnail.size for size, thumbnail in thumbnails},
    )


def write_zip_atomically(destination: Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write (name, bytes) pairs as a stored zip at destination, atomically. Returns its size."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".", suffix=".zip.part")
    try:
        with os.fdopen(fd, "wb") as handle:
            # Images are already compressed: DEFLATE would cost time and save nothing.
            with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
                for name, payload in members:
                    archive.writestr(name, payload)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)
    return size


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (TypeError, ValueError):
        return 1


def _to_output_mode(image: Image.Image, output_format: str) -> Image.Image:
    """Convert any mode (CMYK, palette, 16-bit, alpha...) to one the output format keeps."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: scale into 8 bits instead of clipping to white.
        image = image.convert("I") if mode != "F" else image
        scale = 1 / 256 if mode.startswith("I;16") or mode == "I" else 255
        image = image.point(lambda value: value * scale).convert("L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if output_format == "JPEG":
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGBA")
    if mode in ("L", "RGB"):
        return image
    return image.convert("RGB")


def _original_extension(name: str, input_format: str) -> str:
    suffix = Path(name).suffix.lower()
    if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
        return suffix
    return {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}.get(
        input_format, ".bin"
    )

"""Images that are small on disk and big decoded, made in code in a fraction of a second.

PNGs are written row by row straight into zlib, so that not even the test process holds
their pixels; JPEG and WebP go through Pillow, from a gradient that encodes quickly.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image

from jobs import pipeline  # noqa: F401  (registers the HEIF codec)

# PNG colour types and the bytes per pixel of each kind made here.
_KINDS = {"P": (3, 8, 1), "I;16": (0, 16, 2), "RGBA": (6, 8, 4), "L": (0, 8, 1)}


def png(width: int, height: int, kind: str = "P", *, transparency: bool = False) -> bytes:
    """A PNG of `kind` (palette, 16-bit grey, RGBA or grey) with a repeating pattern."""
    colour_type, depth, pixel_bytes = _KINDS[kind]
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))]
    if kind == "P":
        chunks.append(
            _chunk(b"PLTE", bytes(value for i in range(256) for value in (i, 255 - i, 128)))
        )
        if transparency:
            chunks.append(_chunk(b"tRNS", b"\x00"))
    pattern = bytes(range(256)) * (width * pixel_bytes // 256 + 2)
    compressor = zlib.compressobj(6)
    parts = []
    for row in range(height):
        start = row % 256
        parts.append(compressor.compress(b"\x00" + pattern[start : start + width * pixel_bytes]))
    parts.append(compressor.flush())
    chunks.append(_chunk(b"IDAT", b"".join(parts)))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    grey = Image.linear_gradient("L").resize((width, height))
    if mode == "L":
        return grey
    across = grey.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    return Image.merge("RGB", (grey, across, grey.point(lambda value: 255 - value))).convert(mode)


def jpeg(width: int, height: int, *, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    gradient(width, height).save(buffer, "JPEG", quality=85, progressive=progressive)
    return buffer.getvalue()


def jpeg_header(width: int, height: int, *, progressive: bool = False) -> bytes:
    """A small JPEG whose frame header claims width x height: a decompression bomb that
    cannot even be decoded, refused (or not) from its header alone."""
    data = bytearray(jpeg(16, 16, progressive=progressive))
    frame = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    gradient(width, height, mode).save(buffer, "WEBP", quality=70, method=0)
    return buffer.getvalue()


def webp_header(width: int, height: int) -> bytes:
    """A WebP that claims a width x height canvas in its first chunk and holds no image."""
    vp8x = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + b"VP8 " + bytes(24)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def heic(width: int, height: int, mode: str = "RGB") -> bytes:
    """Encoded in a child process: x265 leaves this process's heap in a shape that later
    measurements of it (memory_in_use) would trip over."""
    code = (
        "import io, sys\n"
        "from jobs.tests import big_images\n"
        "buffer = io.BytesIO()\n"
        f"big_images.gradient({width}, {height}, {mode!r}).save(buffer, 'HEIF', quality=50)\n"
        "sys.stdout.buffer.write(buffer.getvalue())\n"
    )
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, check=True, timeout=120
    ).stdout


def avif(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    gradient(width, height, mode).save(buffer, "AVIF", quality=50, speed=10)
    return buffer.getvalue()


def tiff_in_one_tile(width: int, height: int, tile: tuple[int, int]) -> bytes:
    """A width x height RGBA TIFF held in one deflated tile of `tile` (multiples of 16):
    tiny on disk, while libtiff decodes the whole tile into a buffer of its own."""
    tile_width, tile_height = tile
    if width > tile_width or height > tile_height:
        raise ValueError("the image must fit its one tile")
    pixels = zlib.compress(bytes(tile_width * tile_height * 4), 9)
    bits_at = 8 + len(pixels)
    ifd_at = bits_at + 8
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 4, bits_at),  # 8 bits a sample, stored out of line
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (277, 3, 1, 4),
        (284, 3, 1, 1),  # contiguous samples
        (322, 4, 1, tile_width),
        (323, 4, 1, tile_height),
        (324, 4, 1, 8),
        (325, 4, 1, len(pixels)),
        (338, 3, 1, 2),  # the fourth sample is unassociated alpha
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if kind == 3 and count == 1:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, kind, count, value)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + pixels + struct.pack("<4H", *[8] * 4) + ifd

"""ICC profiles written in the tests, so that no binary profile is committed.

A matrix/TRC RGB display profile (ICC v2) is a header, a tag table and a handful of
tags: the colourants' XYZ (adapted to D50, the PCS white), the white point, a gamma curve
per channel, a description. That is all LittleCMS needs to convert from it.
"""

from __future__ import annotations

import struct

# Colourants adapted to D50 (Bradford), as in the published profiles.
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(value) for value in values)


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    body = b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text
    return body + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + bytes(67)


def _curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def rgb_profile(
    description: str,
    colourants: tuple[tuple[float, float, float], ...],
    gamma: float = 2.2,
) -> bytes:
    """An RGB display profile's bytes: these colourants, one gamma for each channel."""
    red, green, blue = colourants
    curve = _curve(gamma)
    return _profile(
        b"RGB ",
        [
            (b"desc", _desc(description)),
            (b"wtpt", _xyz(D50)),
            (b"rXYZ", _xyz(red)),
            (b"gXYZ", _xyz(green)),
            (b"bXYZ", _xyz(blue)),
            (b"rTRC", curve),
            (b"gTRC", curve),
            (b"bTRC", curve),
            (b"cprt", b"text\0\0\0\0No copyright, generated in a test\0"),
        ],
    )


def grey_profile(description: str, gamma: float) -> bytes:
    """A grey display profile's bytes: one tone curve, D50 white."""
    return _profile(
        b"GRAY",
        [
            (b"desc", _desc(description)),
            (b"wtpt", _xyz(D50)),
            (b"kTRC", _curve(gamma)),
            (b"cprt", b"text\0\0\0\0No copyright, generated in a test\0"),
        ],
    )


def _profile(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A display profile (ICC v2) of this colour space and tags."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        padded = body + bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += padded
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntr"
        + space
        + b"XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)
        + b"".join(_s15(value) for value in D50)
        + b"lcms"
        + bytes(44)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data

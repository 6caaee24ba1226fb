"""ICC profiles for colour that a file describes without one: a HEIC's nclx box.

Phones write wide-gamut HEICs (Display P3) that name their primaries and tone curve in an
nclx box instead of embedding an ICC profile. The pipeline converts colour through ICC
profiles (LittleCMS), so such a description becomes the matrix/TRC display profile it
stands for: the primaries adapted to the ICC's D50 white (Bradford), and the tone curve as
a parametric curve. Only what an SDR display profile can say is made: PQ and HLG (HDR)
curves are left as they were, untagged.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

Matrix = Sequence[Sequence[float]]

# The ICC profile connection space's white, D50.
D50 = (0.9642, 1.0, 0.8249)
BRADFORD = ((0.8951, 0.2664, -0.1614), (-0.7502, 1.7135, 0.0367), (0.0389, -0.0685, 1.0296))
# nclx primaries (ITU-T H.273) that are sRGB's own (BT.709), or unspecified.
SRGB_PRIMARIES = (1, 2)
# nclx transfer characteristics as ICC parametric curves (type 3: g, a, b, c, d), decoding
# a signal to light: the sRGB curve (13, and 2, unspecified, taken as sRGB), and BT.709's
# (1, 6, 14, 15: BT.709, BT.601, BT.2020 10 and 12 bits).
_SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
_BT709_CURVE = (1 / 0.45, 1 / 1.099, 0.099 / 1.099, 1 / 4.5, 0.081)
TRANSFER_CURVES = {
    2: _SRGB_CURVE,
    13: _SRGB_CURVE,
    1: _BT709_CURVE,
    6: _BT709_CURVE,
    14: _BT709_CURVE,
    15: _BT709_CURVE,
}


def nclx_profile(nclx: Mapping[str, object] | None) -> bytes | None:
    """The display profile of a pillow-heif `nclx_profile`, when it names primaries other
    than sRGB's and a tone curve an ICC profile can hold; None otherwise (sRGB already, HDR,
    or not said)."""
    if not nclx or nclx.get("color_primaries") in SRGB_PRIMARIES:
        return None
    transfer = nclx.get("transfer_characteristics")
    curve = TRANSFER_CURVES.get(transfer) if isinstance(transfer, int) else None
    names = [f"color_primary_{name}" for name in ("red", "green", "blue", "white")]
    try:
        points = [(float(nclx[f"{n}_x"]), float(nclx[f"{n}_y"])) for n in names]  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
    if curve is None or any(y <= 0 for _, y in points):
        return None
    return display_profile(points[:3], points[3], curve)


def display_profile(
    primaries: Sequence[tuple[float, float]],
    white: tuple[float, float],
    curve: tuple[float, float, float, float, float],
) -> bytes:
    """A matrix/TRC RGB display profile (ICC v4) of these xy primaries and white point,
    with one parametric tone curve for the three channels."""
    columns = [_xyz(x, y) for x, y in primaries]
    white_xyz = _xyz(*white)
    # Scale each primary so that red + green + blue make the white.
    scale = _solve(_transpose(columns), white_xyz)
    to_xyz = [[columns[c][r] * scale[c] for c in range(3)] for r in range(3)]
    adapted = _multiply(_adaptation(white_xyz), to_xyz)
    colourants = [tuple(adapted[r][c] for r in range(3)) for c in range(3)]
    trc = b"para" + bytes(4) + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in curve)
    tags = [
        (b"desc", _text("Made from the file's nclx colour description")),
        (b"cprt", _text("No copyright")),
        (b"wtpt", _xyz_tag(D50)),
        (b"rXYZ", _xyz_tag(colourants[0])),
        (b"gXYZ", _xyz_tag(colourants[1])),
        (b"bXYZ", _xyz_tag(colourants[2])),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
        (b"chad", _chad(_adaptation(white_xyz))),
    ]
    return _profile(tags)


def _xyz(x: float, y: float) -> tuple[float, float, float]:
    return x / y, 1.0, (1 - x - y) / y


def _adaptation(white: Sequence[float]) -> list[list[float]]:
    """Bradford's adaptation from `white` to D50."""
    cone_white = _apply(BRADFORD, white)
    cone_d50 = _apply(BRADFORD, D50)
    gains = [[cone_d50[i] / cone_white[i] if i == j else 0.0 for j in range(3)] for i in range(3)]
    return _multiply(_inverse(BRADFORD), _multiply(gains, BRADFORD))


def _apply(matrix: Matrix, vector: Sequence[float]) -> list[float]:
    return [sum(matrix[r][c] * vector[c] for c in range(3)) for r in range(3)]


def _multiply(left: Matrix, right: Matrix) -> list[list[float]]:
    return [[sum(left[r][k] * right[k][c] for k in range(3)) for c in range(3)] for r in range(3)]


def _transpose(matrix: Matrix) -> list[list[float]]:
    return [[matrix[c][r] for c in range(3)] for r in range(3)]


def _inverse(matrix: Matrix) -> list[list[float]]:
    (a, b, c), (d, e, f), (g, h, i) = matrix
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    cofactors = [
        [e * i - f * h, c * h - b * i, b * f - c * e],
        [f * g - d * i, a * i - c * g, c * d - a * f],
        [d * h - e * g, b * g - a * h, a * e - b * d],
    ]
    return [[value / det for value in row] for row in cofactors]


def _solve(matrix: Matrix, vector: Sequence[float]) -> list[float]:
    return _apply(_inverse(matrix), vector)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(values: Sequence[float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(value) for value in values)


def _chad(matrix: Matrix) -> bytes:
    return b"sf32" + bytes(4) + b"".join(_s15(value) for row in matrix for value in row)


def _text(text: str) -> bytes:
    """A v4 multi-localized Unicode text (en-US)."""
    encoded = text.encode("utf-16-be")
    return (
        b"mluc"
        + bytes(4)
        + struct.pack(">II", 1, 12)
        + b"enUS"
        + struct.pack(">II", len(encoded), 28)
        + encoded
    )


def _profile(tags: list[tuple[bytes, bytes]]) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    header = (
        struct.pack(">I", offset + len(data))
        + bytes(4)  # no preferred CMM
        + struct.pack(">I", 0x04300000)  # version 4.3
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)  # perceptual intent
        + b"".join(_s15(value) for value in D50)
        + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + data

"""Shared fixtures: temporary folders wired into settings, and images made in code."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image as PILImage


@pytest.fixture
def folders(tmp_path: Path, settings) -> dict[str, Path]:
    """A watch folder, a second folder under the same root, and a media root."""
    root = tmp_path / "inbox"
    watch = root / "watch"
    other = root / "other"
    media = tmp_path / "media"
    for path in (watch, other, media):
        path.mkdir(parents=True)
    settings.WATCH_FOLDER = watch
    settings.WATCH_ROOTS = [watch, root]
    settings.MEDIA_ROOT = media
    settings.SETTLE_SECONDS = 0
    return {"root": root, "watch": watch, "other": other, "media": media}


def image_bytes(
    size: tuple[int, int] = (640, 480),
    mode: str = "RGB",
    fmt: str = "JPEG",
    colour: object = (200, 30, 30),
) -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def drop() -> Callable[..., Path]:
    """Write a file into a folder, as a person dropping it would."""

    def write(folder: Path, name: str, data: bytes | None = None) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes() if data is None else data)
        return path

    return write

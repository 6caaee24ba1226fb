"""Every file-system effect of Parroter: writing files whole, and nothing else yet.

A file appears under its real name only once complete: it is written under a temporary
name in the same folder, fsynced, renamed, and the rename made durable.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(destination: Path, tag: str = "") -> Iterator[BinaryIO]:
    """A file to write that appears at `destination` only complete, or not at all.

    The temporary file is named after the destination and the writer's `tag`
    (`.<name>.<tag>.<random>.part`), so that one a killed process left can be found and
    removed, and only that one. Folders it had to create are removed again if nothing was
    written.
    """
    created = _make_folders(destination.parent)
    prefix = f".{destination.name}." + (f"{tag}." if tag else "")
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=prefix, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    fsync_directory(destination.parent)


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for path in missing:
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return missing


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

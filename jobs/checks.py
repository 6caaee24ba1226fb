"""Start-up checks of the settings that no environment helper can judge alone.

They run with every `manage.py` command, `make run` included, so a bad combination stops
Parroter before its first sweep rather than failing that sweep (id parroter.E001).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, register


def _overlap(first: Path, second: Path) -> bool:
    return first == second or first.is_relative_to(second) or second.is_relative_to(first)


@register()
def check_folders(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """The watch folder and MEDIA_ROOT must be apart: originals are moved out of the one
    into the other, and a sweep of MEDIA_ROOT would take archives for new images. A root of
    WATCH_ROOTS may hold MEDIA_ROOT (a sweep is refused any folder overlapping it), but not
    lie inside it."""
    media = Path(settings.MEDIA_ROOT).resolve()
    clashes = []
    watch = Path(settings.WATCH_FOLDER)
    if _overlap(watch.resolve(), media):
        clashes.append(f"WATCH_FOLDER ({watch}) overlaps MEDIA_ROOT ({media})")
    for root in map(Path, settings.WATCH_ROOTS[1:]):
        if root.resolve().is_relative_to(media):
            clashes.append(f"WATCH_ROOTS entry {root} lies inside MEDIA_ROOT ({media})")
    return [
        Error(clash, hint="Point them at folders apart from each other.", id="parroter.E001")
        for clash in clashes
    ]

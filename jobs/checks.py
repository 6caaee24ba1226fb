"""Start-up checks of the settings that no environment helper can judge alone.

They run with every `manage.py` command, `make run` included, so a bad combination stops
Parroter before its first sweep rather than failing that sweep (id parroter.E001).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    """The watched folders and MEDIA_ROOT must be apart: originals are moved out of the
    one into the other, and a sweep of MEDIA_ROOT would take archives for new images."""
    media = Path(settings.MEDIA_ROOT).resolve()
    errors: list[CheckMessage] = []
    named: Iterable[tuple[str, Path]] = [
        ("WATCH_FOLDER", Path(settings.WATCH_FOLDER)),
        *(("WATCH_ROOTS", Path(root)) for root in settings.WATCH_ROOTS[1:]),
    ]
    for name, folder in named:
        if _overlap(folder.resolve(), media):
            errors.append(
                Error(
                    f"{name} ({folder}) overlaps MEDIA_ROOT ({media})",
                    hint="Point them at folders apart from each other.",
                    id="parroter.E001",
                )
            )
    return errors

"""Periodic tasks from settings and from the admin, living side by side without a fight.

The rule: a periodic task whose name is in `CELERY_BEAT_SCHEDULE` (or Celery's own
`celery.backend_cleanup`) belongs to the settings. django-celery-beat rewrites such a row on
every beat start, so the admin shows it read-only (it may only be switched off or on).
`Scheduler` below marks those rows when beat starts; a marked row whose entry has since left
the settings is disabled and unmarked, and from then on is an ordinary admin-made task.
Every other row belongs to the admin, and beat never touches it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import astuple
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask, PeriodicTasks
from django_celery_beat.schedulers import DatabaseScheduler

from . import watcher
from .health import SWEEP_TASK, BeatHeartbeat
from .storage import Arrival

logger = logging.getLogger(__name__)

WATCH_ENTRY = "sweep-watch-folder"
SETTINGS_MARK = "Defined in settings (CELERY_BEAT_SCHEDULE): edits made here are overwritten"
CLEANUP_TASK = "celery.backend_cleanup"


def settings_owned_names() -> set[str]:
    """Names of the periodic tasks the settings (and Celery itself) write on beat start."""
    names = set(getattr(settings, "CELERY_BEAT_SCHEDULE", {}) or {})
    if getattr(settings, "CELERY_RESULT_EXPIRES", None):
        names.add(CLEANUP_TASK)
    return names


def is_settings_owned(task: PeriodicTask) -> bool:
    return task.name in settings_owned_names()


def sweep_kwargs(task: PeriodicTask) -> dict[str, Any]:
    """A periodic task's keyword arguments as a dict; {} when they are not a JSON object.

    Kwargs may be edited by hand, so they are read here only and each reader decides what
    a missing or wrong value means (the sweep itself fails with a recorded reason).
    """
    try:
        kwargs = json.loads(task.kwargs or "{}")
    except ValueError:
        return {}
    return kwargs if isinstance(kwargs, dict) else {}


def named_folder(task: PeriodicTask) -> str | None:
    """The folder a sweep schedule's kwargs name, as written; None when they name none."""
    folder = sweep_kwargs(task).get("folder")
    return folder if isinstance(folder, str) and folder else None


def retire_removed_entries(owned: set[str]) -> list[str]:
    """Mark settings-owned rows; disable marked rows whose settings entry is gone."""
    mark = f"{SETTINGS_MARK} when beat starts. Change it through the environment."
    PeriodicTask.objects.filter(name__in=owned).exclude(description=mark).update(description=mark)
    retired = list(
        PeriodicTask.objects.filter(description__startswith=SETTINGS_MARK)
        .exclude(name__in=owned)
        .values_list("name", flat=True)
    )
    if retired:
        note = (
            "Was defined in settings (CELERY_BEAT_SCHEDULE) until its entry was removed; "
            f"disabled when beat started on {timezone.localtime():%Y-%m-%d %H:%M}. "
            "It is now an ordinary periodic task: enable or delete it here."
        )
        PeriodicTask.objects.filter(name__in=retired).update(
            enabled=False, description=note, last_run_at=None
        )
        PeriodicTasks.update_changed()
        logger.warning("disabled periodic tasks removed from settings: %s", ", ".join(retired))
    return retired


class Scheduler(DatabaseScheduler):
    """django-celery-beat's DatabaseScheduler, plus the settings/admin ownership rule, and
    a heartbeat on its ticks for /healthz, and with WATCH_EVENTS a sweep of WATCH_FOLDER as
    soon as files were finished there (jobs/watcher.py)."""

    def __init__(self, *args, **kwargs) -> None:
        self.heartbeat = BeatHeartbeat()
        self.watching: threading.Event | None = None
        # Whether the watch folder's schedule is enabled, as beat last read it: switched off
        # in the admin, the watch sends nothing either.
        self.watch_enabled = False
        super().__init__(*args, **kwargs)

    def sweep_watch_folder(self, arrived: list[Arrival]) -> None:
        """Send the watch folder's settings-defined sweep now, as beat would: under its
        schedule's name, so that one finding nothing (the periodic sweep took the files
        first, or holds the folder) is counted as idle, not recorded. `arrived`: files
        renamed in, which the sweep may take without the settle wait."""
        if not self.watch_enabled:
            return
        entry: dict[str, Any] = settings.CELERY_BEAT_SCHEDULE[WATCH_ENTRY]
        kwargs = dict(entry["kwargs"])
        shown = dict(kwargs)  # the task result's arguments: a count, not a thousand numbers
        if arrived:
            kwargs["arrived"] = [astuple(arrival) for arrival in arrived]
            shown["arrived"] = f"{len(arrived)} file(s) renamed in"
        self.app.send_task(
            entry["task"],
            kwargs=kwargs,
            kwargsrepr=repr(shown),
            headers={"periodic_task_name": WATCH_ENTRY},
            expires=entry["options"]["expire_seconds"],
        )

    def close(self) -> None:
        if self.watching is not None:
            self.watching.set()
        super().close()

    def setup_schedule(self) -> None:
        super().setup_schedule()
        retire_removed_entries(settings_owned_names())
        # Read here: a first start makes the row after the schedule's first read.
        self.watch_enabled = PeriodicTask.objects.filter(name=WATCH_ENTRY, enabled=True).exists()
        # Here, not in __init__: `celery beat` makes a lazy instance first, for its banner,
        # which never sets up its schedule; a watch started there sent every sweep twice.
        watched = settings.WATCH_EVENTS and WATCH_ENTRY in settings.CELERY_BEAT_SCHEDULE
        if watched and self.watching is None:
            _, self.watching = watcher.start(
                Path(settings.WATCH_FOLDER), settings.SETTLE_SECONDS, self.sweep_watch_folder
            )
            if not self.watch_enabled:
                logger.info("the watch sends no sweep while %s is switched off", WATCH_ENTRY)

    def all_as_schedule(self) -> dict[str, Any]:
        """The enabled rows, read again whenever one changed (an admin switched one)."""
        schedule = super().all_as_schedule()
        enabled = WATCH_ENTRY in schedule
        if self.watching is not None and enabled != self.watch_enabled:
            if enabled:
                logger.info("the watch sends sweeps again: %s is switched on", WATCH_ENTRY)
            else:
                logger.info("the watch sends no sweep while %s is switched off", WATCH_ENTRY)
        self.watch_enabled = enabled
        return schedule

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        """Send a due entry; a sweep the admin scheduled without an expiry of its own gets
        one just before its next is due, as the settings' sweeps have (expiring_before_next):
        sweeps left waiting by stopped or busy workers are dropped, not run one by one
        (a minute's stop with sixty schedules left 1,700)."""
        if entry.task == SWEEP_TASK and "expires" not in entry.options:
            expires = until_next_due(entry.schedule) * 0.9
            if expires > 0:
                entry.options = {**entry.options, "expires": max(1.0, expires)}
        return super().apply_async(entry, producer, advance, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        interval = super().tick(*args, **kwargs)
        self.heartbeat.tick()
        return interval


def until_next_due(schedule: Any) -> float:
    """Seconds from now until a schedule that is sent now is due again; 0 if never."""
    try:
        return float(schedule.remaining_estimate(schedule.now()).total_seconds())
    except (ValueError, TypeError, AttributeError) as exc:
        logger.warning("cannot tell when %s is due next: %s", schedule, exc)
        return 0.0


def next_run(task: PeriodicTask, now: datetime | None = None) -> datetime | None:
    """When beat will next send this task, as far as the row tells; None if never."""
    if not task.enabled or (task.one_off and task.total_run_count):
        return None
    now = now or timezone.now()
    if task.clocked_id:
        return task.clocked.clocked_time
    if task.start_time and task.start_time > now:
        return task.start_time
    if task.last_run_at is None and task.interval_id:
        return now  # an interval task that never ran is due at once
    try:
        # A crontab or solar task that never ran waits for its next slot from now.
        remaining = task.schedule.remaining_estimate(task.last_run_at or now)
    except (ValueError, TypeError, AttributeError) as exc:
        logger.warning("cannot tell the next run of %s: %s", task.name, exc)
        return None
    when = now + max(remaining, timedelta(0))
    return (when + timedelta(microseconds=500_000)).replace(microsecond=0)  # to the second

"""The project's Celery app, with each pool process writing down when every part of a task
began and ended, for bench/system.py's account of where the time between images goes.

Each task's times go to BENCH_PHASES as one JSON line, written after the task (one small
append a task). A part: Celery's STARTED and SUCCESS result rows, `jobs.runner`'s run, and
putting the original away inside it. With them, the process's peak resident memory so far,
to set against WORKER_MEMORY_MB.
"""

from __future__ import annotations

import json
import os
import resource
import time

from celery.signals import task_postrun, task_prerun, worker_process_init

from project.celery import app

_marks: list[tuple[str, float]] = []


def _mark(what: str) -> None:
    _marks.append((what, time.time()))


def _timed(what: str, function):
    def timed(*args, **kwargs):
        _mark(f"{what} start")
        try:
            return function(*args, **kwargs)
        finally:
            _mark(f"{what} end")

    return timed


@task_prerun.connect
def _task_starts(sender=None, **kwargs) -> None:
    _marks.clear()
    _mark("prerun")


@task_postrun.connect
def _task_ended(sender=None, **kwargs) -> None:
    _mark("postrun")
    line = {
        "pid": os.getpid(),
        "task": sender.name if sender else "",
        "marks": _marks,
        # KiB on Linux.
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    with open(os.environ["BENCH_PHASES"], "a") as phases:
        phases.write(json.dumps(line) + "\n")


@worker_process_init.connect
def _time_the_parts(**kwargs) -> None:
    # Django is ready only now, in the pool process.
    from django_celery_results.backends.database import DatabaseBackend

    from jobs import runner

    runner.process_image = _timed("run", runner.process_image)
    runner.put_original_away = _timed("put away", runner.put_original_away)
    store = DatabaseBackend._store_result

    def store_result(self, task_id, result, state, *args, **kwargs):
        return _timed(f"{state} row", store)(self, task_id, result, state, *args, **kwargs)

    DatabaseBackend._store_result = store_result


__all__ = ["app"]

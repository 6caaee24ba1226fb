"""The inotify watch: a finished file brings a sweep before the next SWEEP_INTERVAL."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path

import pytest

from jobs import storage, watcher
from jobs.models import Image, ScheduleActivity, Sweep

from .conftest import image_bytes
from .processes import wait_for


def watching(
    folder: Path, settle_seconds: float = 0.1
) -> tuple[threading.Event, threading.Event, threading.Thread]:
    """watcher.watch on folder in a thread; returns (sweep wanted, stop, thread)."""
    wanted = threading.Event()
    thread, stop = watcher.start(folder, settle_seconds, lambda arrived: wanted.set())
    return wanted, stop, thread


def test_watch_wants_a_sweep_for_a_written_file(tmp_path):
    wanted, stop, thread = watching(tmp_path)
    try:
        (tmp_path / "photo.jpg").write_bytes(b"pixels")
        assert wanted.wait(30)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_watch_wants_a_sweep_for_a_file_renamed_in(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    watched = tmp_path / "watched"
    watched.mkdir()
    (staging / "photo.jpg").write_bytes(b"pixels")
    wanted, stop, thread = watching(watched)
    try:
        os.rename(staging / "photo.jpg", watched / "photo.jpg")
        assert wanted.wait(30)
    finally:
        stop.set()
        thread.join(10)


def test_watch_sends_files_renamed_in_at_once_and_written_ones_once_settled(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    for name in ("one.jpg", "two.jpg"):
        (staging / name).write_bytes(b"pixels")
    sweeps: queue.Queue[tuple[float, list[storage.Arrival]]] = queue.Queue()
    settle = 3.0
    thread, stop = watcher.start(
        watched, settle, lambda arrived: sweeps.put((time.monotonic(), arrived))
    )
    assert thread is not None
    try:
        start = time.monotonic()
        (watched / "written.jpg").write_bytes(b"pixels")
        os.rename(staging / "one.jpg", watched / "one.jpg")
        os.rename(staging / "two.jpg", watched / "sub" / "two.jpg")
        arrivals = [
            storage.Arrival.of((watched / name).lstat()) for name in ("one.jpg", "sub/two.jpg")
        ]

        # A sweep for the burst of renames (two, if this thread was held up between them),
        # well before the settle time, naming them and not the file written in place.
        carried: list[storage.Arrival] = []
        sent, arrived = sweeps.get(timeout=30)
        while arrived:
            assert sent - start < settle / 2
            carried += arrived
            sent, arrived = sweeps.get(timeout=30)
        assert sorted(carried, key=lambda a: a.inode) == sorted(arrivals, key=lambda a: a.inode)
        # Then one without arrivals, once the settle time passed, for whatever settled.
        assert sent - start >= settle
        with pytest.raises(queue.Empty):
            sweeps.get(timeout=1)
    finally:
        stop.set()
        thread.join(10)


class ScriptedInotify:
    """Stands in for the kernel's queue: each read returns the next scripted events at once,
    then nothing until the watch is stopped."""

    def __init__(self, script: list[watcher.Events], stop: threading.Event) -> None:
        self.script, self.stop = script, stop

    def read(self, timeout: float) -> watcher.Events:
        if self.script:
            return self.script.pop(0)
        time.sleep(max(0.0, min(timeout, 0.01)))
        return watcher.Events()

    def close(self) -> None:
        self.stop.set()


def test_watch_carries_at_most_a_message_of_arrivals_and_still_sends_a_settled_sweep():
    burst = [storage.Arrival(1, inode, 10, 20, 30) for inode in range(1500)]
    stop = threading.Event()
    sweeps: list[list[storage.Arrival]] = []

    def on_ready(arrived: list[storage.Arrival]) -> None:
        sweeps.append(arrived)
        if not arrived:
            stop.set()  # the settled sweep is the last one expected

    inotify = ScriptedInotify([watcher.Events(finished=True, arrived=burst)], threading.Event())
    thread = threading.Thread(target=watcher.watch, args=(inotify, 0.2, on_ready, stop))
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    # The first ARRIVALS_PER_SWEEP in one message; the others wait for the settled sweep.
    assert sweeps == [burst[: watcher.ARRIVALS_PER_SWEEP], []]
    assert inotify.stop.is_set()  # closed when stopped


def test_watch_follows_folders_made_after_it_started(tmp_path):
    wanted, stop, thread = watching(tmp_path)
    try:
        (tmp_path / "holiday").mkdir()
        assert wanted.wait(30)  # a new folder may hold files already: swept
        wanted.clear()
        wait_for(lambda: len(watched_folders()) >= 2, timeout=30, what="the new watch")
        (tmp_path / "holiday" / "photo.jpg").write_bytes(b"pixels")
        assert wanted.wait(30)
    finally:
        stop.set()
        thread.join(10)


def watched_folders() -> list[str]:
    """The watches of this process's inotify instances, from /proc."""
    fds = Path(f"/proc/{os.getpid()}/fdinfo")
    return [
        line
        for fd in fds.iterdir()
        for line in _read(fd).splitlines()
        if line.startswith("inotify wd:")
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def wait_until_done_and_put_away(name: str) -> None:
    """Until the image is done and its original has left the watch folder (the runner
    records done first, then moves the original)."""
    wait_for(
        lambda: Image.objects.filter(name=name, status=Image.Status.DONE, in_folder=False).exists(),
        timeout=90,
        what=f"{name} to be done and put away",
    )


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_beat_with_watch_events_sweeps_a_dropped_file_before_the_interval(system, folders, drop):
    # No periodic sweep within the test: only the watch can take the file.
    system.environment.update({"SWEEP_INTERVAL": "3600", "WATCH_EVENTS": "true"})
    system.worker()
    system.beat()
    wait_for(lambda: "watching" in system.logs(), timeout=30, what="the watch to start")
    drop(folders["watch"], "photo.jpg", image_bytes((800, 600)))

    wait_until_done_and_put_away("photo.jpg")
    image = Image.objects.get(name="photo.jpg")
    # Sent by the watch (the interval never came round), under the schedule's name, as beat
    # sends it: so a watch sweep that finds nothing counts as idle instead of leaving a row.
    assert "Sending due task sweep-watch-folder" not in system.logs()
    assert (image.sweep.trigger, image.sweep.schedule_name) == (
        Sweep.Trigger.SCHEDULE,
        "sweep-watch-folder",
    )
    assert list(Sweep.objects.all()) == [image.sweep]
    activity = ScheduleActivity.objects.get(schedule_name="sweep-watch-folder")
    assert activity.last_found == image.sweep
    # One watch in beat, not one per scheduler instance `celery beat` makes: so one drop
    # sends one sweep.
    beat_log = (system.log_dir / "beat.log").read_text(errors="replace")
    assert beat_log.count("for finished files") == 1, beat_log
    assert not (folders["watch"] / "photo.jpg").exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_beat_with_watch_events_takes_a_file_renamed_in_without_the_settle_wait(
    system, folders, drop, tmp_path
):
    # Neither the interval nor the settle time comes round within the test: only a file
    # renamed in can be taken, and one written in place must wait.
    system.environment.update(
        {"SWEEP_INTERVAL": "3600", "SETTLE_SECONDS": "3600", "WATCH_EVENTS": "true"}
    )
    system.worker()
    system.beat()
    wait_for(lambda: "watching" in system.logs(), timeout=30, what="the watch to start")
    written = drop(folders["watch"], "written.jpg", image_bytes((640, 480)))
    staged = drop(tmp_path / "staging", "renamed.jpg", image_bytes((800, 600)))
    os.rename(staged, folders["watch"] / "renamed.jpg")

    wait_until_done_and_put_away("renamed.jpg")
    assert list(Image.objects.values_list("name", flat=True)) == ["renamed.jpg"]
    assert written.exists()
    sweep = Image.objects.get().sweep
    assert (sweep.claimed, sweep.unstable) == (1, 1)


def test_watch_never_enters_a_folder_swapped_for_a_link_before_its_event_is_read(tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    outside = tmp_path / "outside"
    (outside / "a" / "b").mkdir(parents=True)
    inotify = watcher.Inotify(watched)
    try:
        (watched / "made").mkdir()
        (watched / "d").mkdir()  # its event waits to be read...
        (watched / "d").rmdir()
        (watched / "d").symlink_to(outside, target_is_directory=True)  # ...a link in its place
        inotify.read(5)
        assert sorted(inotify.folders.values()) == [watched, watched / "made"]
        # Nothing outside is watched: a file finished there brings no sweep.
        (outside / "a" / "x.jpg").write_bytes(b"pixels")
        assert not inotify.read(0.5).finished
        (watched / "made" / "y.jpg").write_bytes(b"pixels")
        assert inotify.read(5).finished
    finally:
        inotify.close()


def read_all(inotify: watcher.Inotify) -> watcher.Events:
    """Every event waiting in the kernel's queue, read as one."""
    seen = watcher.Events()
    while True:
        events = inotify.read(0.2)
        if not (events.finished or events.arrived):
            return seen
        seen.finished |= events.finished
        seen.arrived += events.arrived


@pytest.mark.parametrize("gone", ["deleted", "moved away"])
def test_watch_watches_the_folder_again_once_it_is_made_anew(tmp_path, gone):
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    inotify = watcher.Inotify(watched)
    try:
        if gone == "deleted":
            shutil.rmtree(watched)
        else:
            watched.rename(tmp_path / "old")
        assert read_all(inotify).finished
        assert inotify.folders == {}
        # Not back yet: nothing is watched, and nothing outside is.
        assert not inotify.read(0.1).finished
        (watched / "new").mkdir(parents=True)
        # Back: swept for what it may hold, and watched with its folders again.
        assert inotify.read(1).finished
        assert sorted(inotify.folders.values()) == [watched, watched / "new"]
        (staging / "photo.jpg").write_bytes(b"pixels")
        os.rename(staging / "photo.jpg", watched / "new" / "photo.jpg")
        arrived = read_all(inotify).arrived
        assert arrived == [storage.Arrival.of((watched / "new" / "photo.jpg").lstat())]
        if gone == "moved away":
            (tmp_path / "old" / "sub" / "x.jpg").write_bytes(b"pixels")
            assert not read_all(inotify).finished  # the old folder is no longer watched
    finally:
        inotify.close()


def test_watch_follows_folders_made_while_its_queue_overflowed(tmp_path):
    inotify = watcher.Inotify(tmp_path)
    try:
        # Two events a file (made, then written): more than the kernel's queue holds.
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        for index in range(limit // 2 + 100):
            (tmp_path / f"{index}.jpg").write_bytes(b"")
        (tmp_path / "holiday").mkdir()  # its event is lost
        assert read_all(inotify).finished
        assert tmp_path / "holiday" in inotify.folders.values()
        (tmp_path / "holiday" / "photo.jpg").write_bytes(b"pixels")
        assert inotify.read(5).finished
    finally:
        inotify.close()

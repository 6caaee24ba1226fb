"""Sweep as soon as a local writer is done, instead of at the next SWEEP_INTERVAL.

A Linux inotify watch on WATCH_FOLDER and every folder below it.
- A file renamed in (IN_MOVED_TO) is whole when its name appears: a sweep is sent at once
  (after a burst of renames has paused for ARRIVAL_QUIET), carrying each file's identity as
  it was just after the rename (storage.Arrival). The sweep takes such a file without the
  settle wait if it is still exactly that file, unchanged.
- A file closed after writing (IN_CLOSE_WRITE) may be written again: it starts a timer of
  SETTLE_SECONDS, and when that runs out one sweep is sent, which judges every file by its
  ctime and mtime as the periodic sweep does. So does a renamed file, as a second chance
  (the first sweep may have found the folder held by another).

The watched folder deleted or moved away is watched again once a folder is back in its
place, and a queue overflow walks the tree again for the folders made meanwhile: otherwise
the watch would stay deaf until beat restarts.

Polling stays the guarantee: a network share sends no events for other hosts' writes, a
queue overflow loses events, and a watch can fail (too many folders for
fs.inotify.max_user_watches). The periodic sweep finds whatever the watch missed. Measured
in bench/system.py: see bench/README.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .storage import Arrival, NotBeneath, open_folder

logger = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Writes done, files renamed in, folders made (to watch them too), a folder moved away (the
# watched folder itself: a new one may be made in its place).
WATCHED_EVENTS = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_MOVE_SELF | IN_ONLYDIR
_EVENT = struct.Struct("iIII")
# A sweep's settle check compares whole nanoseconds of two clocks read apart: leave a margin.
SETTLE_MARGIN = 0.05
# Renamed files are sent once no rename came for this long (a burst, `mv *`, is one sweep),
# or this long after the first of them at the latest (a steady stream still moves).
ARRIVAL_QUIET = 0.05
ARRIVAL_LONGEST = 0.5
# Arrivals carried by one sweep message; a larger burst's others settle as usual.
ARRIVALS_PER_SWEEP = 1000


@dataclass
class Events:
    """What one read of the watch saw."""

    # A file was finished or events were lost: a sweep is wanted once things settle.
    finished: bool = False
    # Files renamed in, as they were just after it: these need not settle.
    arrived: list[Arrival] = field(default_factory=list)


class Inotify:
    """An inotify instance on a folder tree: which of its folders saw a finished file."""

    def __init__(self, root: Path) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        self.root = root
        self.folders: dict[int, Path] = {}
        # The watch on the root itself; None while the root is missing (not made yet,
        # deleted or moved away): it is watched again once a folder is there.
        self.root_wd: int | None = None
        self.add_tree(root)

    def add_tree(self, top: Path) -> None:
        """Watch `top` and every folder below it, each reached from the root without
        following any link (storage.open_folder): a folder swapped for a link between its
        event and this walk is neither walked nor watched, so nothing outside is."""
        pending = [top]
        while pending:
            folder = pending.pop()
            try:
                opened = open_folder(folder, [self.root])
            except (OSError, NotBeneath):
                continue  # gone already, or reached through a link now
            with opened:
                # Watched through the descriptor just opened, not by its path again.
                self._add(folder, f"/proc/self/fd/{opened.fd}")
                pending.extend(
                    folder / entry.name
                    for entry in opened.entries()
                    if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
                )

    def _add(self, folder: Path, target: str) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(target), WATCHED_EVENTS)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR):
                return  # gone already
            # ENOSPC: fs.inotify.max_user_watches reached. The periodic sweep still runs.
            logger.warning("cannot watch %s: %s", folder, os.strerror(code))
            return
        self.folders[wd] = folder
        if folder == self.root:
            self.root_wd = wd

    def _forget_all(self) -> None:
        """The root is gone: drop every watch (a folder moved away with it stays watched
        otherwise), until a folder is there again."""
        for wd in list(self.folders):
            self._libc.inotify_rm_watch(self.fd, wd)
        self.folders.clear()
        self.root_wd = None

    def read(self, timeout: float) -> Events:
        """Wait up to `timeout` s for events, and tell what they mean."""
        events = Events()
        if self.root_wd is None:
            # The watched folder was missing: watch it once it is back, and sweep what a
            # new one may hold already.
            self.add_tree(self.root)
            if self.root_wd is not None:
                logger.info("watching %s again", self.root)
                events.finished = True
                return events
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return events
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return events
        offset = 0
        overflowed = False
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                events.finished = True
                # Lost events may be folders made: walk the tree again (a folder watched
                # already keeps its watch).
                overflowed = True
            elif wd == self.root_wd and mask & (IN_IGNORED | IN_MOVE_SELF):
                logger.warning("%s is gone; watching it again once it is back", self.root)
                self._forget_all()
                events.finished = True
            elif mask & IN_IGNORED:
                self.folders.pop(wd, None)
            elif mask & IN_MOVE_SELF:
                pass  # a subfolder moved: its new parent's IN_MOVED_TO says where, if inside
            elif mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and wd in self.folders:
                # A folder made or moved in: watch it, and sweep for what it already holds.
                self.add_tree(self.folders[wd] / os.fsdecode(name))
                events.finished = True
            elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                events.finished = True
                if mask & IN_MOVED_TO and wd in self.folders:
                    arrival = _arrival(self.folders[wd] / os.fsdecode(name))
                    if arrival is not None:
                        events.arrived.append(arrival)
        if overflowed and self.root_wd is not None:
            self.add_tree(self.root)
        return events

    def close(self) -> None:
        os.close(self.fd)


def _arrival(path: Path) -> Arrival | None:
    """The identity of a file just renamed in; None if it is gone or not a plain file."""
    try:
        status = path.lstat()
    except OSError:
        return None
    return Arrival.of(status) if stat.S_ISREG(status.st_mode) else None


def watch(
    inotify: Inotify,
    settle_seconds: float,
    on_ready: Callable[[list[Arrival]], None],
    stop: threading.Event,
) -> None:
    """Until stop is set: call on_ready(arrivals) soon after files were renamed in, and
    on_ready([]) once files were finished and SETTLE_SECONDS passed since. Closes the
    inotify instance when done."""
    wait = settle_seconds + SETTLE_MARGIN
    # When the next settled sweep is due, and when the last file was finished. The first
    # file of a long copy is not kept waiting for the last: a sweep is sent once the first
    # settled, and another for those finished too late for it.
    due: float | None = None
    last = 0.0
    # Renamed files not sent yet, and when their sweep is due.
    arrived: list[Arrival] = []
    first_arrival = soon = 0.0
    try:
        while not stop.is_set():
            deadlines = [when for when in (due, soon if arrived else None) if when is not None]
            timeout = min(deadlines) - time.monotonic() if deadlines else 1.0
            events = inotify.read(min(1.0, timeout))
            now = time.monotonic()
            if events.arrived:
                first_arrival = first_arrival if arrived else now
                arrived.extend(events.arrived)
                soon = min(now + ARRIVAL_QUIET, first_arrival + ARRIVAL_LONGEST)
            if events.finished:
                last = now
                due = due or last + wait
            if arrived and now >= soon:
                _send(on_ready, arrived[:ARRIVALS_PER_SWEEP])
                arrived = []
            if due is not None and now >= due:
                sent = time.monotonic()
                _send(on_ready, [])
                due = last + wait if last + wait > sent else None
    finally:
        inotify.close()


def _send(on_ready: Callable[[list[Arrival]], None], arrivals: list[Arrival]) -> None:
    try:
        on_ready(arrivals)
    except Exception:
        # A broker blip: the periodic sweep takes these files instead.
        logger.warning("could not send a sweep for finished files", exc_info=True)


def start(
    folder: Path, settle_seconds: float, on_ready: Callable[[list[Arrival]], None]
) -> tuple[threading.Thread | None, threading.Event]:
    """Watch folder's tree from now on, in a daemon thread; set the event to stop it.

    The thread is None where inotify is missing or fails: the periodic sweep only.
    """
    stop = threading.Event()
    try:
        inotify = Inotify(folder)
    except (OSError, AttributeError) as exc:
        logger.warning("no inotify watch on %s (%s): the periodic sweep only", folder, exc)
        return None, stop
    logger.info("watching %s for finished files (%d folders)", folder, len(inotify.folders))
    thread = threading.Thread(
        target=watch,
        args=(inotify, settle_seconds, on_ready, stop),
        name="watch-folder",
        daemon=True,
    )
    thread.start()
    return thread, stop

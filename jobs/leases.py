"""Keeping leases alive from one thread of the process for as long as the work under each runs.

A lease (an image's run, a folder's sweep lock) ends LEASE_SECONDS after its last renewal,
by the database's clock: a holder that dies, freezes or loses its host stops renewing, and
another host may take over once it runs out. No PID or host name decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, connection

logger = logging.getLogger(__name__)

# Renewals per lease: two may fail (a busy database) before the lease runs out.
RENEWALS_PER_LEASE = 3
# How long the keeper waits after failing outside a renewal (out of memory) to try again.
KEEPER_RETRY_SECONDS = 0.1


@contextlib.contextmanager
def renewed(renew: Callable[[], bool], what: str) -> Iterator[None]:
    """Call `renew` every LEASE_SECONDS / RENEWALS_PER_LEASE while the body runs.

    `renew` returns False once the lease is no longer held (it ran out and was taken over):
    renewing stops then, and whatever the holder still does must be conditional on its
    token. Once the body is left, `renew` is not called again, nor still running.
    """
    lease = _Lease(renew, what, time.monotonic() + _period())
    keeper = _keeper()
    keeper.add(lease)
    try:
        yield
    finally:
        keeper.remove(lease)


def held() -> list[str]:
    """What the leases this process renews are of ("image 12"), for tests and debugging."""
    keeper = _keeper()
    with keeper.changed:
        return sorted(lease.what for lease in keeper.leases)


def _period() -> float:
    return float(settings.LEASE_SECONDS) / RENEWALS_PER_LEASE


@dataclass(eq=False)
class _Lease:
    renew: Callable[[], bool]
    what: str
    due: float  # time.monotonic() of its next renewal


class _Keeper:
    """The one thread of a process that renews its leases, each when it is due.

    A thread started and joined for each lease cost every sweep 0.2 ms on SQLite and 0.8 ms
    on PostgreSQL (every SWEEP_INTERVAL, and every image), to renew nothing nearly always:
    a sweep lasts milliseconds. This thread sleeps until the earliest renewal due, and for
    at most one renewal period when none is held, so a lease taken is due no earlier than
    the thread wakes: taking one costs no wake-up. The thread opens a database connection
    of its own (Django's are per thread) only once it renews, and closes it once no lease
    is held.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.leases: set[_Lease] = set()
        self.renewing: _Lease | None = None
        self.wake_at = time.monotonic()
        self.connected = False
        threading.Thread(target=self._run, name="lease keeper", daemon=True).start()

    def add(self, lease: _Lease) -> None:
        with self.changed:
            self.leases.add(lease)
            if lease.due < self.wake_at:  # LEASE_SECONDS made shorter (tests do)
                self.changed.notify()

    def remove(self, lease: _Lease) -> None:
        with self.changed:
            self.leases.discard(lease)
            while self.renewing is lease:
                self.changed.wait()
            if self.connected and not self.leases:
                self.changed.notify()

    def _run(self) -> None:
        # The keeper is every lease's in this process: nothing may end its thread. A pool
        # process runs at its RLIMIT_DATA (jobs/worker.py), so any allocation here may
        # fail while a decode holds the memory, and succeed again once it is freed.
        while True:
            try:
                self._turn()
            except Exception:
                with contextlib.suppress(Exception):
                    logger.exception("the lease keeper failed; it goes on")
                time.sleep(KEEPER_RETRY_SECONDS)

    def _turn(self) -> None:
        with self.changed:
            lease = self._next_due()
            self.renewing = lease
            self.connected = True
        if lease is None:
            self._close()
            with self.changed:
                self.connected = False
            return
        keep = True
        try:
            keep = self._renew(lease)
        finally:
            with self.changed:
                # First: the body waiting for this renewal to be over may be left.
                self.renewing = None
                self.changed.notify_all()
                if keep:
                    lease.due = time.monotonic() + _period()
                else:
                    self.leases.discard(lease)

    def _next_due(self) -> _Lease | None:
        """The lease to renew now; None when no lease is held and a connection is to close.

        Waits (holding `changed`, released while waiting) until one of them is the case.
        """
        while True:
            now = time.monotonic()
            if not self.leases and self.connected:
                return None
            due = min(self.leases, key=lambda lease: lease.due, default=None)
            if due is not None and due.due <= now:
                return due
            self.wake_at = due.due if due is not None else now + _period()
            self.changed.wait(self.wake_at - now)

    @staticmethod
    def _close() -> None:
        try:
            connection.close()
        except DatabaseError as exc:
            logger.warning("cannot close the lease keeper's database connection: %s", exc)

    def _renew(self, lease: _Lease) -> bool:
        """Renew one lease; False once it is not to be renewed again."""
        try:
            if lease.renew():
                return True
            logger.warning("%s was taken over by another run", lease.what)
        except DatabaseError as exc:
            logger.warning("cannot renew the lease of %s: %s", lease.what, exc)
            connection.close_if_unusable_or_obsolete()
            return True
        except MemoryError:
            # The lease is still held: renewed again once the memory is back.
            logger.warning("cannot renew the lease of %s: out of memory", lease.what)
            return True
        except Exception:
            # Its renewal is broken for good; the other leases go on being renewed.
            logger.exception("renewing the lease of %s failed; it is no longer renewed", lease.what)
        return False


_keeper_of: dict[int, _Keeper] = {}
_keeper_lock = threading.Lock()


def _forget_keeper() -> None:
    # In a forked child: the lock may have been held by a thread that is not there.
    global _keeper_lock
    _keeper_lock = threading.Lock()
    _keeper_of.clear()


os.register_at_fork(after_in_child=_forget_keeper)


def _keeper() -> _Keeper:
    """This process's keeper, started on first use: a child forked from a process that had
    one has no thread of it (only the forking thread goes on in a child)."""
    pid = os.getpid()
    keeper = _keeper_of.get(pid)
    if keeper is None:
        with _keeper_lock:
            keeper = _keeper_of.get(pid)
            if keeper is None:
                _keeper_of.clear()
                keeper = _keeper_of[pid] = _Keeper()
    return keeper

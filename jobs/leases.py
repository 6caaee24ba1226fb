"""Keeping a lease alive from a thread of its own for as long as the work under it runs.

A lease (an image's run, a folder's sweep lock) ends LEASE_SECONDS after its last renewal,
by the database's clock: a holder that dies, freezes or loses its host stops renewing, and
another host may take over once it runs out. No PID or host name decides.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from django.conf import settings
from django.db import DatabaseError, connection

logger = logging.getLogger(__name__)

# Renewals per lease: two may fail (a busy database) before the lease runs out.
RENEWALS_PER_LEASE = 3


@contextlib.contextmanager
def renewed(renew: Callable[[], bool], what: str) -> Iterator[None]:
    """Call `renew` every LEASE_SECONDS / RENEWALS_PER_LEASE while the body runs.

    `renew` returns False once the lease is no longer held (it ran out and was taken over):
    renewing stops then, and whatever the holder still does must be conditional on its
    token. The thread opens a database connection of its own (Django's are per thread)
    only once it renews, and closes it when it stops.
    """
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_until, args=(renew, what, stop), name=f"lease of {what}", daemon=True
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _renew_until(renew: Callable[[], bool], what: str, stop: threading.Event) -> None:
    try:
        while not stop.wait(settings.LEASE_SECONDS / RENEWALS_PER_LEASE):
            try:
                if not renew():
                    logger.warning("%s was taken over by another run", what)
                    return
            except DatabaseError as exc:
                logger.warning("cannot renew the lease of %s: %s", what, exc)
                connection.close_if_unusable_or_obsolete()
    finally:
        connection.close()

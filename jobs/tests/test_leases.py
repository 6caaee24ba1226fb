"""Leases renewed by the process's one keeper thread while the work under each runs."""

from __future__ import annotations

import os
import threading
import time

from jobs import leases

from .processes import wait_for


def test_renewed_starts_no_thread_per_lease(monkeypatch):
    with leases.renewed(lambda: True, "the first"):
        pass  # the keeper starts with the process's first lease
    started: list[str] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    for number in range(3):
        with leases.renewed(lambda: True, f"sweep {number}"):
            assert leases.held() == [f"sweep {number}"]
    assert started == []
    assert leases.held() == []


def test_renewed_renews_each_lease_while_its_body_runs_and_never_after(settings):
    settings.LEASE_SECONDS = 0.3  # a renewal every 0.1 s
    calls = {"long": 0, "short": 0}

    def counter(name: str):
        def renew() -> bool:
            calls[name] += 1
            return True

        return renew

    with leases.renewed(counter("long"), "long"):
        with leases.renewed(counter("short"), "short"):
            wait_for(lambda: calls["short"] >= 2, timeout=10, what="two renewals")
        short = calls["short"]
        wait_for(lambda: calls["long"] >= short + 2, timeout=10, what="the other one renewed")
    ended = dict(calls)
    time.sleep(0.5)
    assert calls == ended
    assert calls["short"] == short


def test_renewed_stops_renewing_a_lease_taken_over(settings):
    settings.LEASE_SECONDS = 0.3
    calls: list[int] = []

    def taken_over() -> bool:
        calls.append(1)
        return False

    with leases.renewed(taken_over, "taken over"):
        wait_for(lambda: not leases.held(), timeout=10, what="the keeper to give up")
        time.sleep(0.3)
    assert calls == [1]


def test_renewed_in_a_forked_child_is_renewed_by_a_keeper_of_its_own(settings):
    settings.LEASE_SECONDS = 0.3
    with leases.renewed(lambda: True, "the parent's"):
        child = os.fork()
        if child == 0:  # pragma: no cover (its exit code tells)
            renewals: list[int] = []
            with leases.renewed(lambda: not renewals.append(1), "the child's"):
                time.sleep(1)
            os._exit(0 if renewals and leases.held() == [] else 1)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_renewed_goes_on_renewing_after_running_out_of_memory(settings, monkeypatch):
    # A pool process runs at its RLIMIT_DATA (jobs/worker.py): while a decode holds nearly
    # all of it, any allocation of the keeper's thread may fail, and then succeed again.
    settings.LEASE_SECONDS = 0.3
    keeper = leases._keeper()
    real_close = keeper._close
    failed: list[str] = []

    def renew_once_out_of_memory() -> bool:
        if not failed:
            failed.append("renew")
            raise MemoryError
        return True

    def close_once_out_of_memory() -> None:
        if failed == ["renew"]:
            failed.append("close")
            raise MemoryError
        real_close()

    monkeypatch.setattr(keeper, "_close", close_once_out_of_memory)
    with leases.renewed(renew_once_out_of_memory, "image 1"):
        wait_for(lambda: failed == ["renew"], timeout=10, what="a renewal out of memory")
        time.sleep(0.3)
        assert leases.held() == ["image 1"], "memory came back: the lease is still ours"
    wait_for(lambda: failed == ["renew", "close"], timeout=10, what="a close out of memory")
    renewals: list[int] = []
    with leases.renewed(lambda: not renewals.append(1), "image 2"):
        wait_for(lambda: len(renewals) >= 2, timeout=10, what="the keeper to renew again")

"""Helpers for the browser tests: Debian's Chromium under Playwright, and a real web server.

Never a downloaded browser: Playwright drives /usr/bin/chromium, or the tests skip saying why.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connections

from jobs.management.commands.run import child_commands
from jobs.redis_server import free_port

from .processes import BASE_DIR, Processes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = BASE_DIR / "test-artifacts"


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser tests need Debian's chromium at {CHROMIUM} "
            "(`apt-get install chromium`; .ci/run installs it)"
        )


@contextmanager
def chromium_page(base_url: str, width: int = 1360, height: int = 900) -> Iterator:
    """A fresh page in headless Chromium, its downloads allowed, at a desktop size."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(
                base_url=base_url,
                accept_downloads=True,
                viewport={"width": width, "height": height},
            )
            context.set_default_timeout(20_000)
            yield context.new_page()
        finally:
            browser.close()
            # Inside Playwright's event loop Django hands out database connections of their
            # own; closed here, or PostgreSQL refuses to drop the test database at the end.
            connections.close_all()


def start_web(processes: Processes) -> str:
    """gunicorn serving the project like `make run` does; returns its base URL once it answers."""
    port = free_port()
    # The very command line `make run` uses for its web server.
    command = child_commands("127.0.0.1", port, processes.log_dir, roles=["web"])["web"]
    process = processes.spawn("web", command)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode}:\n{processes.logs()}")
        try:
            with urllib.request.urlopen(base_url + "/login/", timeout=2):  # noqa: S310
                return base_url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError(f"gunicorn did not answer on {base_url}:\n{processes.logs()}")


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/ (not committed)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

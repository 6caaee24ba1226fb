"""Shared fixtures: temporary folders wired into settings, and images made in code."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage

from jobs import runner, sweeper
from jobs.models import Image, Sweep
from jobs.redis_server import start_bundled_redis
from project.celery import app as celery_app

from .processes import Processes, database_url
from .rabbitmq import ensure_rabbitmq, own_vhost


@pytest.fixture
def folders(tmp_path: Path, settings) -> dict[str, Path]:
    """A watch folder, a second folder under the same root, and a media root."""
    root = tmp_path / "inbox"
    watch = root / "watch"
    other = root / "other"
    media = tmp_path / "media"
    for path in (watch, other, media):
        path.mkdir(parents=True)
    settings.WATCH_FOLDER = watch
    settings.WATCH_ROOTS = [watch, root]
    settings.MEDIA_ROOT = media
    settings.SETTLE_SECONDS = 0
    return {"root": root, "watch": watch, "other": other, "media": media}


@contextlib.contextmanager
def disk_of_its_own(folders: dict[str, Path], area: str, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted as MEDIA_ROOT/<area> (needs root; else the test skips)."""
    path = folders["media"] / area
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def image_bytes(
    size: tuple[int, int] = (640, 480),
    mode: str = "RGB",
    fmt: str = "JPEG",
    colour: object = (200, 30, 30),
) -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def image_row(index: int, status: str, **fields) -> Image:
    """An image record of no real file, `<index>.jpg` in /in, with `status` and `fields`."""
    return Image.objects.create(
        folder="/in",
        name=f"{index}.jpg",
        source_path=f"/in/{index}.jpg",
        in_folder=False,
        file_size=1,
        mtime_ns=0,
        sizes=["64x64"],
        sizes_key="64x64",
        sha256=f"{index:064x}",
        status=status,
        **fields,
    )


def jpeg_tables(quality: int) -> dict[int, list[int]]:
    """The quantization tables Pillow writes at this JPEG quality: how to tell it afterwards."""
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buffer, "JPEG", quality=quality)
    return PILImage.open(buffer).quantization


def noise_jpeg(size: tuple[int, int] = (600, 400)) -> bytes:
    """A JPEG of noise: its thumbnails' sizes depend strongly on the quality."""
    buffer = io.BytesIO()
    PILImage.effect_noise(size, 80).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def drop() -> Callable[..., Path]:
    """Write a file into a folder, as a person dropping it would."""

    def write(folder: Path, name: str, data: bytes | None = None) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes() if data is None else data)
        return path

    return write


@pytest.fixture
def sweep_and_process(folders) -> Callable[..., list[Image]]:
    """Sweep a folder through jobs.sweeper.sweep_folder, then process what it claimed here.

    Returns the claimed images by name. `process=False` only claims; `options` are the
    sweep's output options (quality).
    """

    def run(
        folder: Path | None = None,
        sizes: list[str] | None = None,
        *,
        process: bool = True,
        **options: object,
    ) -> list[Image]:
        outcome = sweeper.sweep_folder(
            str(folder or folders["watch"]), sizes or ["64x64"], options=options
        )
        assert outcome.sweep.status == Sweep.Status.DONE, outcome.sweep.error
        if process:
            for image_id in outcome.to_queue:
                runner.process_image(image_id)
        return list(Image.objects.filter(id__in=outcome.to_queue).order_by("name"))

    return run


@pytest.fixture
def redis_server():
    with start_bundled_redis() as server:
        yield server


@pytest.fixture
def system(transactional_db, folders, redis_server, tmp_path, request, settings):
    """Worker and beat processes configured like `make run`, on temporary folders."""
    environment = {
        **os.environ,
        "WATCH_FOLDER": str(folders["watch"]),
        "WATCH_ROOTS": str(folders["root"]),
        "MEDIA_ROOT": str(folders["media"]),
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_server.url,
        "BROKER_URL": redis_server.url,
        # The test database's name differs from the one this process's settings saw.
        "INSTANCE": settings.INSTANCE,
        "SWEEP_INTERVAL": "1",
        "SETTLE_SECONDS": "0.5",
        "REQUEUE_AFTER": "5",
        # A killed worker's images come back within seconds, not the default 30.
        "LEASE_SECONDS": "3",
        "DJANGO_SECRET_KEY": "integration-tests",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(logs, environment)
    yield processes
    processes.stop_all()
    # Shown by pytest only when the test fails.
    request.node.add_report_section("teardown", "celery logs", processes.logs())


@contextlib.contextmanager
def celery_broker(url: str) -> Iterator[None]:
    """Point this process's Celery app at another broker for a while."""
    app = celery_app

    def forget_connections() -> None:
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        if "amqp" in app.__dict__:
            app.amqp._producer_pool = None

    previous = app.conf.broker_url
    forget_connections()
    app.conf.broker_url = url
    try:
        yield
    finally:
        forget_connections()
        app.conf.broker_url = previous


@pytest.fixture
def broker(redis_server):
    """Point this process's Celery app at the test Redis, so that views really send."""
    with celery_broker(redis_server.url):
        yield redis_server


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    """A RabbitMQ on 127.0.0.1:5672, started or installed when missing; else the test skips."""
    reason = ensure_rabbitmq()
    if not reason and not shutil.which("rabbitmqctl"):
        reason = "RabbitMQ answers, but rabbitmqctl is not here to make a vhost per test"
    if reason:
        pytest.skip(reason)


@pytest.fixture
def amqp_url(rabbitmq) -> Iterator[str]:
    """The AMQP URL of a virtual host of this test's own."""
    with own_vhost() as url:
        yield url

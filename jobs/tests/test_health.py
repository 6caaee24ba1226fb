"""/healthz against real parts: worker and beat processes, Redis, and mounts made in the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import health
from jobs.models import Heartbeat

from .conftest import celery_broker
from .processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def quick(settings):
    """Heartbeats every second; a generous deadline, since this tests what is reported, not
    how fast (the machine running the tests may be busy)."""
    settings.HEARTBEAT_SECONDS = 1
    settings.HEALTH_TIMEOUT = 5
    settings.MIN_FREE_MB = 1
    return settings


def healthz(client: Client) -> tuple[int, dict]:
    response = client.get(reverse("jobs:healthz"))
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()


def answer_is(client: Client, code: int, failing: list[str]) -> dict | None:
    status, body = healthz(client)
    return body if status == code and body["failing"] == failing else None


def start_system(system) -> None:
    system.environment["HEARTBEAT_SECONDS"] = "1"
    system.worker()
    system.beat()


@pytest.mark.integration
def test_healthz_is_200_with_everything_up_and_names_beat_when_it_stops(
    system, broker, quick, client, folders
):
    start_system(system)
    body = wait_for(lambda: answer_is(client, 200, []), timeout=60, what="a healthy system")
    checks = body["checks"]
    assert body["status"] == "ok"
    assert {"database", "broker", "beat", "workers"} <= set(checks)
    assert checks["workers"]["alive"] == [f"worker@{socket.gethostname()}"]
    assert checks["beat"]["age_seconds"] <= health.stale_after().total_seconds()
    for folder in (folders["watch"], folders["media"]):
        assert checks[f"folder {folder}"]["ok"]
        assert checks[f"folder {folder}"]["free_mb"] >= 1

    system.kill("beat")
    body = wait_for(
        lambda: answer_is(client, 503, ["beat"]), timeout=60, what="beat reported stopped"
    )
    assert body["status"] == "unhealthy"
    assert "no tick for" in body["checks"]["beat"]["error"]
    assert body["checks"]["workers"]["ok"], "the worker still beats"

    # A warm shutdown of the worker's main process: it removes its own heartbeat.
    worker = system.running.pop("worker")
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    assert not Heartbeat.objects.filter(kind=Heartbeat.Kind.WORKER).exists()
    assert answer_is(client, 503, ["beat", "workers"])


@pytest.mark.integration
def test_healthz_names_a_watch_folder_whose_mount_disappears(
    system, broker, quick, client, folders
):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    watch = folders["watch"]
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g", "parroter-test", str(watch)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        start_system(system)
        body = wait_for(lambda: answer_is(client, 200, []), timeout=60, what="a healthy system")
        assert body["checks"][f"folder {watch}"]["mount"] == str(watch)
        assert Heartbeat.objects.get(kind="folder", name=str(watch)).detail == {"mount": str(watch)}
    finally:
        # Lazy: a sweep listing the folder at this instant must not make it fail with EBUSY.
        subprocess.run(["umount", "--lazy", str(watch)], check=True)
    status, body = healthz(client)
    assert status == 503
    assert body["failing"] == [f"folder {watch}"]
    assert "not mounted" in body["checks"][f"folder {watch}"]["error"]
    assert str(watch) in body["checks"][f"folder {watch}"]["error"]


def test_healthz_reports_a_hung_watch_folder_instead_of_waiting_for_it(
    quick, client, broker, folders
):
    """A FUSE mount whose server never answers: every stat of it blocks, as on a dead NFS
    server. Closing the server's end afterwards releases the blocked probe."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("mounting a FUSE file system needs root and /dev/fuse")
    watch = str(folders["watch"])
    server = os.open("/dev/fuse", os.O_RDWR)
    try:
        options = f"fd={server},rootmode=40000,user_id=0,group_id=0"
        mounted = subprocess.run(
            ["mount", "-i", "-t", "fuse", "-o", options, "parroter-hung", watch],
            pass_fds=(server,),
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"mounting FUSE is not permitted here: {mounted.stderr.strip()}")
        # Short, as the hung probe takes all of it; long enough for the database (a new
        # connection), the broker and the other folder to answer on a busy machine.
        quick.HEALTH_TIMEOUT = 2
        for _ in range(2):
            status, body = healthz(client)
            assert status == 503
            assert f"folder {watch}" in body["failing"]
            assert "no answer within 2 s" in body["checks"][f"folder {watch}"]["error"]
            assert body["checks"][f"folder {folders['media']}"]["ok"], "the others still answer"
            assert body["checks"]["database"]["ok"]
        hung = health._folder_probes[("probe_folder", watch)]
        assert not hung.done.is_set()
        healthz(client)
        assert health._folder_probes[("probe_folder", watch)] is hung, (
            "the hung probe is waited on, not repeated"
        )
    finally:
        os.close(server)  # aborts the connection: the blocked stat fails with ENOTCONN
        subprocess.run(["umount", "--lazy", watch], capture_output=True, check=False)
    assert hung.done.wait(10)


def test_healthz_names_the_broker_when_redis_is_down(quick, client, broker, folders):
    status, body = healthz(client)
    assert body["checks"]["broker"] == {"ok": True}
    assert "broker" not in body["failing"]
    broker.process.kill()
    broker.process.wait()
    status, body = healthz(client)
    assert status == 503
    assert "broker" in body["failing"]
    assert "connecting" in body["checks"]["broker"]["error"].lower()


def test_healthz_checks_the_folders_of_enabled_schedules(quick, client, broker, folders):
    every_minute = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    gone = folders["root"] / "gone"
    gone.mkdir()
    for name, folder, enabled in [
        ("other", folders["other"], True),
        ("gone", gone, True),
        ("off", folders["root"] / "never-made", False),
    ]:
        PeriodicTask.objects.create(
            name=name,
            task="jobs.sweep_folder",
            interval=every_minute,
            kwargs=json.dumps({"folder": str(folder)}),
            enabled=enabled,
        )
    _, body = healthz(client)
    assert body["checks"][f"folder {folders['other']}"]["ok"]
    assert body["checks"][f"folder {gone}"]["ok"]
    assert f"folder {folders['root'] / 'never-made'}" not in body["checks"]
    gone.rmdir()
    status, body = healthz(client)
    assert status == 503
    assert f"folder {gone}" in body["failing"]
    assert f"folder {folders['other']}" not in body["failing"]
    assert "is not a folder" in body["checks"][f"folder {gone}"]["error"]


def test_healthz_fails_a_schedule_folder_every_sweep_would_refuse(
    quick, client, broker, folders, tmp_path
):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    PeriodicTask.objects.create(
        name="outside",
        task="jobs.sweep_folder",
        interval=IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS),
        kwargs=json.dumps({"folder": str(outside)}),
    )
    status, body = healthz(client)
    assert status == 503
    # Beat and workers fail too: none runs in this test.
    assert [name for name in body["failing"] if name.startswith("folder")] == [f"folder {outside}"]
    assert "outside the allowed WATCH_ROOTS" in body["checks"][f"folder {outside}"]["error"]


def test_healthz_names_folders_with_too_little_free_space(quick, client, broker, folders):
    quick.MIN_FREE_MB = 10**12  # more than any disk here
    status, body = healthz(client)
    assert status == 503
    for folder in (folders["watch"], folders["media"]):
        check = body["checks"][f"folder {folder}"]
        assert not check["ok"]
        assert "below MIN_FREE_MB" in check["error"]
        # Within a few MB: whatever else runs on this machine writes meanwhile.
        assert abs(check["free_mb"] - shutil.disk_usage(folder).free // (1024 * 1024)) <= 64


def test_healthz_needs_no_login_and_says_what_has_never_run(quick, client, broker, folders):
    status, body = healthz(client)
    assert status == 503
    assert body["failing"] == ["beat", "workers"]
    assert body["checks"]["beat"]["error"] == "beat has never recorded a tick"
    assert body["checks"]["database"] == {"ok": True}


def test_mount_point_is_the_deepest_mount_holding_a_path():
    assert health.mount_point(Path("/")) == "/"
    assert health.mount_point(Path("/proc/self")) == "/proc"


def test_healthz_and_metrics_are_not_redirected_to_https(quick, client, broker, folders):
    quick.SECURE_SSL_REDIRECT = True
    assert client.get(reverse("jobs:login")).status_code == 301
    assert client.get(reverse("jobs:healthz")).status_code in (200, 503)
    assert client.get(reverse("jobs:metrics")).status_code == 200


@pytest.mark.django_db
def test_healthz_says_an_amqp_broker_refuses_rather_than_timing_out(client, settings):
    # A port nobody listens on: the refusal is the answer, said before the check's deadline
    # (kombu's default retry would wait 2 s first, and the check would say "no answer").
    settings.HEALTH_TIMEOUT = 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with celery_broker(f"amqp://guest:guest@127.0.0.1:{port}//"):
        status, body = healthz(client)
    assert status == 503
    assert "refused" in body["checks"]["broker"]["error"].lower(), body["checks"]["broker"]

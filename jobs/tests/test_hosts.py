"""Several worker hosts sharing one database and one broker, as containers would.

Each "host" is a real Celery worker in PID and UTS namespaces of its own (`unshare`): the
same hostname everywhere and small PIDs (1, 2, 3...) that repeat from host to host, which
is what defeats any "host:pid" notion of who owns a run. Ownership is by token and lease.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from django_celery_results.models import TaskResult

from jobs.models import Image

from .conftest import celery_broker
from .processes import Processes, wait_for
from .test_faults import FAULT_APP, all_final, assert_each_done_once, drop_batch

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HOSTNAME = "samehost"


def start_host(
    system: Processes, name: str, concurrency: int = 2, app: str = FAULT_APP
) -> subprocess.Popen[bytes]:
    """A worker as another host: new PID and UTS namespaces, hostname HOSTNAME.

    The worker is the namespace's init (PID 1); killing it kills everything in there.
    """
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        f"--hostname={name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    script = f"hostname {HOSTNAME} && exec {shlex.join(celery)}"
    return system.spawn(
        name, ["unshare", "--pid", "--uts", "--fork", "--mount-proc", "sh", "-c", script]
    )


def namespace_init(host: subprocess.Popen[bytes]) -> psutil.Process:
    """The host's PID 1, seen from outside: the one child of `unshare --fork`."""
    children = wait_for(
        lambda: psutil.Process(host.pid).children(), timeout=30, what="the namespace's init"
    )
    assert len(children) == 1, children
    return children[0]


def inner_pid(process: psutil.Process) -> int:
    """A process's PID inside its own namespace (the last of /proc/PID/status NSpid)."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {process.pid}")


def host_of_runs(images: list[Image]) -> dict[int, str]:
    """Image id -> the worker node (`host-a@samehost`) running its current run.

    The image's own worker label cannot say: it is `samehost:<pid>` on every host.
    """
    nodes = dict(
        TaskResult.objects.filter(task_id__in=[image.task_id for image in images]).values_list(
            "task_id", "worker"
        )
    )
    return {image.id: (nodes.get(image.task_id) or "").partition("@")[0] for image in images}


def in_flight() -> dict[int, tuple[uuid.UUID, str]]:
    """Image id -> (token, host) of every run in processing now."""
    running = list(Image.objects.filter(status=Image.Status.PROCESSING))
    hosts = host_of_runs(running)
    return {image.id: (image.token, hosts[image.id]) for image in running}


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_of_hosts(request, system) -> str:
    """Both brokers: on RabbitMQ a dead consumer's unacknowledged messages come back at
    once, to the live host, while its runs still hold their leases."""
    if request.param == "rabbitmq":
        amqp_url = request.getfixturevalue("amqp_url")
        system.environment["BROKER_URL"] = amqp_url
        request.getfixturevalue("celery_on_amqp")
    return request.param


@pytest.fixture
def celery_on_amqp(system):
    with celery_broker(system.environment["BROKER_URL"]):
        yield


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_a_host_killed_mid_batch_is_retried_within_a_lease_and_no_live_run_is_taken_over(
    system, folders, broker_of_hosts
):
    if os.geteuid() != 0:
        pytest.skip("new PID and UTS namespaces need root here")
    lease, delay, concurrency = 3.0, 4.0, 2
    system.environment.update(
        LEASE_SECONDS=str(lease),
        # Every run outlives its lease: only renewing keeps it.
        PARROTER_FAULT_DELAY=str(delay),
        # Far beyond the bounds below: the time limit is not what finds a dead host's work.
        IMAGE_SOFT_TIME_LIMIT="280",
        IMAGE_TIME_LIMIT="300",
    )
    sweep_interval = float(system.environment["SWEEP_INTERVAL"])
    batch = drop_batch(folders["watch"], 8)
    hosts = {name: start_host(system, name, concurrency) for name in ("host-a", "host-b")}
    system.beat()

    wait_for(
        lambda: {host for _, host in in_flight().values()} == {"host-a", "host-b"},
        timeout=90,
        what="runs in flight on both hosts",
    )
    inits = {name: namespace_init(process) for name, process in hosts.items()}
    members = {name: [init, *init.children(recursive=True)] for name, init in inits.items()}
    inner = {name: {inner_pid(process) for process in group} for name, group in members.items()}
    assert inner["host-a"] & inner["host-b"] - {1}, f"the hosts' PIDs should overlap: {inner}"
    assert all(inner_pid(init) == 1 for init in inits.values())

    os.kill(inits["host-a"].pid, signal.SIGKILL)  # the namespace's PID 1: the whole host
    killed_at = time.monotonic()
    runs = in_flight()
    done_before = Image.objects.filter(status=Image.Status.DONE).count()
    hosts["host-a"].wait(timeout=30)
    wait_for(
        lambda: not any(process.is_running() for process in members["host-a"]),
        timeout=30,
        what="every process of the killed host to go",
    )
    dead = {image_id: token for image_id, (token, host) in runs.items() if host == "host-a"}
    live = {image_id: token for image_id, (token, host) in runs.items() if host == "host-b"}
    assert dead, "the kill came when host-a had nothing in flight"
    assert live, "host-b had nothing in flight to protect"
    assert done_before < len(batch), "the kill came too late to test anything"

    # Bounds from the settings, generous for a busy machine: the lease runs out at most
    # `lease` after the kill; the next sweep comes within `sweep_interval`, but may wait for
    # a free pool process on host-b (up to two runs of `delay` ahead of it).
    takeover_bound = lease + sweep_interval + 2 * delay + 10
    finish_bound = takeover_bound + math.ceil(len(batch) / concurrency) * (delay + 2)
    taken_over_at = None
    deadline = killed_at + 2 * finish_bound
    while not all_final(len(batch)):
        assert time.monotonic() < deadline, "the batch did not finish after the kill"
        if (
            taken_over_at is None
            and not Image.objects.filter(
                id__in=dead, status=Image.Status.PROCESSING, token__in=dead.values()
            ).exists()
        ):
            taken_over_at = time.monotonic()
        time.sleep(0.2)
    finished_at = time.monotonic()

    assert_each_done_once(batch, folders["media"])
    assert taken_over_at is not None
    assert taken_over_at - killed_at <= takeover_bound, (
        f"the dead host's runs were taken over {taken_over_at - killed_at:.1f} s after the "
        f"kill; LEASE_SECONDS is {lease:g}"
    )
    assert finished_at - killed_at <= finish_bound
    images = {image.id: image for image in Image.objects.all()}
    for image_id, token in dead.items():
        assert images[image_id].token != token
        assert images[image_id].attempts == 2, "retried once, by another host"
    for image_id, token in live.items():
        assert images[image_id].token == token, "a live run was taken over"
        assert images[image_id].attempts == 1
    others = set(images) - set(dead) - set(live)
    assert [images[image_id].attempts for image_id in others] == [1] * len(others)
    assert {image.worker.partition(":")[0] for image in images.values()} == {HOSTNAME}
    assert all(process.is_running() for process in members["host-b"]), "host-b lives on"
    transport = "amqp://guest:**@" if broker_of_hosts == "rabbitmq" else "redis://"
    assert f"transport:   {transport}" in system.logs(), "the hosts used the broker under test"

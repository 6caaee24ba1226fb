"""A real RabbitMQ for tests: the one on 127.0.0.1:5672, else installed and started here.

Each test gets a virtual host of its own, so runs never see each other's queues.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from jobs.broker import BrokerUnavailable, broker_version

GUEST = "amqp://guest:guest@127.0.0.1:5672"
START_TIMEOUT = 90


def answers() -> bool:
    try:
        broker_version(f"{GUEST}//", timeout=2)
    except BrokerUnavailable:
        return False
    return True


def ensure_rabbitmq() -> str:
    """'' once a RabbitMQ answers on 127.0.0.1:5672 (started, or installed, if need be).

    Otherwise the reason there is none, for a skip.
    """
    if answers():
        return ""
    if os.geteuid() != 0:
        return "no RabbitMQ answers on 127.0.0.1:5672, and installing one needs root"
    if not shutil.which("rabbitmq-server"):
        if not shutil.which("apt-get"):
            return "no RabbitMQ answers on 127.0.0.1:5672, and there is no apt-get to install one"
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "rabbitmq-server"],
        ):
            installed = subprocess.run(
                command, env=environment, capture_output=True, timeout=900, check=False
            )
            if installed.returncode != 0:
                return f"could not install rabbitmq-server: {installed.stderr.decode()[-300:]}"
    if shutil.which("service"):
        subprocess.run(
            ["service", "rabbitmq-server", "start"], capture_output=True, timeout=120, check=False
        )
    if not answers():
        subprocess.run(
            ["rabbitmq-server", "-detached"], capture_output=True, timeout=120, check=False
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if answers():
            return ""
        time.sleep(1)
    return f"RabbitMQ was started but did not answer on 127.0.0.1:5672 within {START_TIMEOUT} s"


def rabbitmqctl(*arguments: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *arguments], capture_output=True, timeout=120, check=True)


@contextmanager
def own_vhost() -> Iterator[str]:
    """A fresh virtual host that guest may use; its AMQP URL. Deleted afterwards."""
    vhost = f"parroter-test-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{GUEST}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)

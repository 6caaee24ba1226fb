"""`manage.py run` (what `make run` runs), as real processes: Redis, web, worker and beat."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis
from django.conf import settings
from PIL import Image as PILImage

from jobs.redis_server import RedisServer, free_port, start_bundled_redis
from jobs.supervisor import STOP_TIMEOUTS

pytestmark = pytest.mark.integration

START_TIMEOUT = 60
WORK_TIMEOUT = 60
STOP_TIMEOUT = 90


@dataclass
class Run:
    """One `manage.py run` process, its folders, and every descendant seen so far."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    watch: Path
    media: Path
    database: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            sys.stderr.write(f"--- manage.py run output ---\n{self.output()}\n")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pid_of(self, name: str) -> int:
        found = re.search(rf"started {name} \(pid (\d+)\)", self.output())
        assert found is not None, f"no pid logged for {name}"
        return int(found[1])

    def collect_descendants(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        """Poll check until true; fail with the output if the deadline or an exit comes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.collect_descendants()
            if check():
                return
            if self.process.poll() is not None:
                pytest.fail(f"run exited ({self.process.returncode}) before {what}")
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout} s waiting for {what}")

    def alive_descendants(self) -> list[psutil.Process]:
        return [process for process in self.seen.values() if is_alive(process)]

    def survivors(self, within: float = 10.0) -> list[psutil.Process]:
        return still_alive(self.seen.values(), within)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as connection:
            return connection.execute(sql).fetchall()


def is_alive(process: psutil.Process) -> bool:
    try:
        # Orphans are reaped by init; a zombie waiting for that is already dead.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive(processes: Iterable[psutil.Process], within: float = 10.0) -> list[psutil.Process]:
    """Those still alive after up to `within` seconds.

    A process killed an instant ago may still be exiting (freeing its memory takes a while on
    a busy machine); one that was forgotten is still there at the end.
    """
    processes = list(processes)
    deadline = time.monotonic() + within
    while True:
        alive = [process for process in processes if is_alive(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def command_line(process: psutil.Process) -> str:
    """Its command line, or "" once it has exited."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def login_page_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (320, 240), (30, 120, seed * 9 % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def run_env(tmp_path: Path, port: int, default_redis: str) -> dict[str, str]:
    # MAKEFLAGS and friends: `make test`'s, not for the `make run` a test starts.
    unset = ("REDIS_URL", "BROKER_URL", "INSTANCE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env.update(
        RUN_DIR=str(tmp_path / "var"),
        WATCH_FOLDER=str(tmp_path / "watch"),
        MEDIA_ROOT=str(tmp_path / "media"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        PORT=str(port),
        SWEEP_INTERVAL="1",
        SETTLE_SECONDS="0.5",
        WORKER_CONCURRENCY="1",
        PARROTER_DEFAULT_REDIS=default_redis,
        DJANGO_SUPERUSER_USERNAME="boss",
        DJANGO_SUPERUSER_PASSWORD="correct-horse-battery",  # noqa: S106
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start `manage.py run`; whatever happens, nothing it started outlives the test."""
    runs: list[Run] = []
    logs: list[io.BufferedWriter] = []

    def start(
        default_redis: str,
        *arguments: str,
        port: int = 0,
        make: bool = False,
        name: str = "run",
        **environment: str,
    ) -> Run:
        port = port or free_port()
        log = tmp_path / f"{name}.log"
        handle = open(log, "wb")  # noqa: SIM115
        logs.append(handle)
        command = [sys.executable, "manage.py", "run", *arguments]
        if make:
            # `make run` itself; -o: the requirements are installed, whatever the stamps say.
            assert not arguments
            command = ["make", "--silent", "-o", ".venv/.runtime-installed", "run"]
        # A session of its own, like a terminal's foreground job: signals come only from us.
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            env={**run_env(tmp_path, port, default_redis), **environment},
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        run = Run(
            process=process,
            log=log,
            port=port,
            watch=tmp_path / "watch",
            media=tmp_path / "media",
            database=tmp_path / "db.sqlite3",
        )
        runs.append(run)
        return run

    yield start

    for run in runs:
        if run.process.poll() is None:
            run.collect_descendants()
            run.process.send_signal(signal.SIGTERM)
            try:
                run.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
        for process in run.alive_descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    for handle in logs:
        handle.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis without a password, as one found already running on a machine would be."""
    with start_bundled_redis(password="") as server:
        yield server


def wait_until_up(run: Run) -> None:
    run.wait_for("the admin login page", lambda: login_page_answers(run.port), START_TIMEOUT)
    run.wait_for(
        "web, worker and beat",
        lambda: all(f"started {name} (pid" in run.output() for name in ("web", "worker", "beat")),
        START_TIMEOUT,
    )


def stop_with(run: Run, signum: signal.Signals) -> int:
    run.collect_descendants()
    # To the whole process group, as a terminal's Ctrl-C: the children must not see it.
    os.killpg(run.process.pid, signum)
    return run.process.wait(STOP_TIMEOUT)


def test_run_serves_admin_processes_a_dropped_image_and_stops_on_ctrl_c(
    start_run: Callable[[str], Run],
) -> None:
    # Nothing answers at this "default" address, so run must start the bundled Redis.
    with start_run(f"127.0.0.1:{free_port()}") as run:
        wait_until_up(run)
        output = run.output()
        assert f"admin: http://127.0.0.1:{run.port}/admin/" in output
        assert f"watching {run.watch}" in output
        assert "started bundled Redis 6.2" in output
        assert run.query("select username from auth_user where is_superuser") == [("boss",)]
        found = re.search(r"started bundled Redis \S+ at (\S+) \(pid (\d+)\)", output)
        assert found is not None
        assert int(found[2]) in run.seen
        # Its password stays out of the log, but is where `celery -A project` finds it.
        assert found[1].startswith("redis://:***@127.0.0.1:")
        instance = re.search(r"instance (\S+): queues", output)
        assert instance is not None
        url_file = run.watch.parent / "var" / f"{instance[1]}.broker"
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert url_file.read_text().startswith("redis://:")
        assert url_file.read_text().split("@")[1] == found[1].split("@")[1] + "\n"
        run.wait_for("the worker", lambda: re.search(r"\S+@\S+ ready\.", run.output()), 60)
        status = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "project", "status", "--timeout", "3"],
            cwd=settings.BASE_DIR,
            env=run_env(run.watch.parent, run.port, "127.0.0.1:1"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(rf"->  {instance[1]}-[0-9a-f]+@\S+: OK", status.stdout), status.stdout
        assert "1 node online" in status.stdout
        assert "DuplicateNodename" not in status.stdout + status.stderr

        (run.watch / "holiday.jpg").write_bytes(jpeg_bytes())
        run.wait_for(
            "the archive", lambda: any((run.media / "archives").rglob("*.zip")), WORK_TIMEOUT
        )
        run.wait_for(
            "the image to be done in the database",
            lambda: run.query("select name, status from jobs_image") == [("holiday.jpg", "done")],
            WORK_TIMEOUT,
        )
        # The record says done before the original is put away (a crash between the two
        # is repaired by the next sweep), so that move is waited for too.
        run.wait_for(
            "the original to leave the watch folder",
            lambda: not (run.watch / "holiday.jpg").exists(),
            WORK_TIMEOUT,
        )
        # redis, web and its worker, the Celery worker and its pool, beat
        assert len(run.seen) >= 6

        assert stop_with(run, signal.SIGINT) == 0
        assert run.survivors() == []
        output = run.output()
        assert "stopping (SIGINT)" in output
        assert "stopped bundled Redis" in output
        assert not url_file.exists()
        assert list(url_file.parent.iterdir()) == []  # nor the pid file


def test_run_stops_everything_and_fails_when_the_worker_dies(
    start_run: Callable[[str], Run], own_redis: RedisServer
) -> None:
    with start_run(f"127.0.0.1:{own_redis.port}") as run:
        wait_until_up(run)
        worker = psutil.Process(run.pid_of("worker"))
        run.wait_for("the worker's pool process", lambda: bool(worker.children()), START_TIMEOUT)
        pool = worker.children()
        run.collect_descendants()

        # Killed outright, the worker cannot stop its pool: run must not leave it orphaned.
        worker.kill()
        code = run.process.wait(STOP_TIMEOUT)

        assert code != 0
        output = run.output()
        assert "worker was killed by SIGKILL on its own; stopping the rest" in output
        assert "CommandError: worker was killed by SIGKILL unexpectedly" in output
        assert still_alive(pool) == []
        assert run.survivors() == []


def test_run_reuses_a_running_redis_stops_on_sigterm_and_leaves_that_redis_alone(
    start_run: Callable[[str], Run], own_redis: RedisServer
) -> None:
    with start_run(f"127.0.0.1:{own_redis.port}") as run:
        wait_until_up(run)
        reused = [line for line in run.output().splitlines() if "reusing" in line]
        assert len(reused) == 1
        assert (
            f"REDIS_URL is unset: reusing the Redis 6.2.14 found at 127.0.0.1:{own_redis.port}"
            in reused[0]
        )
        assert own_redis.pid not in run.seen

        assert stop_with(run, signal.SIGTERM) == 0
        assert "stopping (SIGTERM)" in run.output()
        assert run.survivors() == []
        with redis.Redis.from_url(own_redis.url) as client:
            assert client.ping()


def test_run_with_unreachable_redis_url_gives_up_after_redis_wait_in_one_line(
    tmp_path: Path,
) -> None:
    env = run_env(tmp_path, free_port(), "127.0.0.1:1")
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["REDIS_WAIT"] = "2"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "run"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    errors = [line for line in result.stderr.splitlines() if line.startswith("CommandError")]
    assert len(errors) == 1, result.stderr
    assert "REDIS_URL redis://127.0.0.1:" in errors[0]
    assert "is not reachable" in errors[0]
    assert "waiting for it" in result.stdout


def test_run_with_its_port_taken_fails_fast_in_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "manage.py", "run"],
            cwd=settings.BASE_DIR,
            env=run_env(tmp_path, port, "127.0.0.1:1"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("CommandError")]
    assert errors == [
        f"CommandError: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "stop what uses it or choose another with PORT=... or --port"
    ]
    assert "bundled Redis" not in result.stdout + result.stderr


def test_run_waits_for_a_redis_that_comes_up_late(start_run: Callable[..., Run]) -> None:
    port = free_port()
    url = f"redis://:late-secret@127.0.0.1:{port}/0"
    with start_run("127.0.0.1:1", REDIS_URL=url) as run:
        run.wait_for("the wait notice", lambda: "waiting for it" in run.output(), START_TIMEOUT)
        assert "late-secret" not in run.output()
        with start_bundled_redis(port, password="late-secret"):  # noqa: S106
            wait_until_up(run)
            (run.watch / "late.jpg").write_bytes(jpeg_bytes())
            run.wait_for(
                "the image",
                lambda: run.query("select status from jobs_image") == [("done",)],
                WORK_TIMEOUT,
            )
            assert stop_with(run, signal.SIGTERM) == 0


def image_statuses(run: Run) -> dict[str, str]:
    return dict(run.query("select name, status from jobs_image"))


def test_killing_the_whole_system_mid_batch_then_starting_again_loses_nothing(
    start_run: Callable[..., Run],
) -> None:
    batch = {f"{index:02}.jpg": jpeg_bytes(index) for index in range(12)}
    slow = {"PARROTER_FAULT_DELAY": "0.4", "REQUEUE_AFTER": "3", "LEASE_SECONDS": "3"}
    arguments = ("--celery-app", "jobs.tests.fault_app")
    # Nothing answers at the default address: the bundled Redis dies with the rest.
    default_redis = f"127.0.0.1:{free_port()}"
    with start_run(default_redis, *arguments, **slow) as run:
        wait_until_up(run)
        for name, data in batch.items():
            (run.watch / name).write_bytes(data)
        run.wait_for(
            "the first images",
            lambda: list(image_statuses(run).values()).count("done") >= 2,
            WORK_TIMEOUT,
        )
        run.collect_descendants()
        # Pull the plug: run itself, web, beat, worker, pool, Redis. Only the live ones, by
        # psutil, which checks each is still the process seen: a PID that came free (the
        # process exited) may belong to anything by now.
        for process in [psutil.Process(run.process.pid), *run.alive_descendants()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        run.process.wait()
        assert list(image_statuses(run).values()).count("done") < len(batch)
    assert run.survivors(within=30) == []

    with start_run(default_redis, *arguments, **slow) as again:
        wait_until_up(again)
        again.wait_for(
            "the whole batch",
            lambda: sorted(image_statuses(again).items()) == [(n, "done") for n in sorted(batch)],
            WORK_TIMEOUT * 2,
        )
        archives = list((again.media / "archives").rglob("*.zip"))
        assert len(archives) == len(batch)
        kept = {
            path.name.split("-", 1)[1]: path
            for path in (again.media / "originals").rglob("*")
            if path.is_file()
        }
        assert {name: path.read_bytes() for name, path in kept.items()} == batch
        assert not list(again.media.rglob("*.part"))
        assert stop_with(again, signal.SIGTERM) == 0


def test_run_restarts_a_worker_that_stops_taking_work(start_run: Callable[..., Run]) -> None:
    with start_run(f"127.0.0.1:{free_port()}", STALL_SECONDS="4") as run:
        wait_until_up(run)
        stuck = run.pid_of("worker")
        # Taken now: once it is gone its PID may be reused by anything.
        stuck_worker = psutil.Process(stuck)
        # Alive and connected, but taking nothing: what a worker that stopped consuming
        # after a broker reconnect looks like from outside.
        os.killpg(stuck, signal.SIGSTOP)
        (run.watch / "waiting.jpg").write_bytes(jpeg_bytes())
        run.wait_for("the watchdog", lambda: "restarting it" in run.output(), WORK_TIMEOUT)
        run.wait_for(
            "the image",
            lambda: image_statuses(run) == {"waiting.jpg": "done"},
            # Generous: were the worker not continued, run would wait out its stop timeout.
            STOP_TIMEOUTS["worker"] + WORK_TIMEOUT,
        )
        assert not is_alive(stuck_worker)
        # Continued with its SIGTERM pending, it shut down on its own: no need to kill it.
        assert "run    | the worker stopped; started a new one" in run.output()
        assert stop_with(run, signal.SIGTERM) == 0


def process_group(process: psutil.Process) -> int | None:
    """Its process group, or None once it has exited."""
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def test_kill_9_of_make_alone_stops_the_whole_run(start_run: Callable[..., Run]) -> None:
    with start_run(f"127.0.0.1:{free_port()}", make=True) as run:
        wait_until_up(run)
        run.wait_for(
            "the worker's pool process",
            lambda: bool(psutil.Process(run.pid_of("worker")).children()),
            START_TIMEOUT,
        )
        run.collect_descendants()
        # make alone, not its process group: the supervisor under it is orphaned.
        run.process.kill()
        run.process.wait()
        assert run.survivors(within=STOP_TIMEOUT) == []
        assert "is gone" in run.output()


def test_kill_9_of_make_run_then_make_run_again_leaves_nothing_of_the_old_run(
    start_run: Callable[..., Run],
) -> None:
    default_redis = f"127.0.0.1:{free_port()}"
    with start_run(default_redis, make=True) as run:
        wait_until_up(run)
        run.wait_for(
            "the worker's pool process",
            lambda: bool(psutil.Process(run.pid_of("worker")).children()),
            START_TIMEOUT,
        )
        run.collect_descendants()
        # What is running now: the set-up steps before (migrate, createsuperuser) are gone.
        old = {pid: process for pid, process in run.seen.items() if is_alive(process)}
        supervisor = next(p for p in old.values() if "manage.py" in command_line(p))
        worker = run.pid_of("worker")
        frozen = {p.pid for p in old.values() if process_group(p) == worker}
        assert len(frozen) >= 2  # the worker and its pool
        # Frozen, the worker cannot act on its parent-death signal: only the next run can
        # stop it and its pool.
        os.killpg(worker, signal.SIGSTOP)
        # The terminal's job, make and the supervisor under it, killed outright.
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()

        def only_the_frozen_left() -> bool:
            return {p.pid for p in old.values() if is_alive(p)} == frozen

        # Web (and its workers), beat and the bundled Redis die with the supervisor.
        deadline = time.monotonic() + STOP_TIMEOUT
        while not only_the_frozen_left() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_alive(supervisor)
        assert only_the_frozen_left(), [p.pid for p in old.values() if is_alive(p)]

    # Same instance, same port: the old web server would hold it, had it survived.
    with start_run(default_redis, make=True, port=run.port) as again:
        wait_until_up(again)
        assert "left running by a previous run" in again.output()
        assert [p.pid for p in old.values() if is_alive(p)] == []
        (again.watch / "after.jpg").write_bytes(jpeg_bytes())
        again.wait_for(
            "the image", lambda: image_statuses(again) == {"after.jpg": "done"}, WORK_TIMEOUT
        )
        # make passes the signal on, waits for the run to finish, then dies of it too.
        assert stop_with(again, signal.SIGTERM) == -signal.SIGTERM
        assert "run    | stopped\n" in again.output()
        assert "stopped bundled Redis" in again.output()
        assert again.survivors() == []


def test_run_refuses_to_start_beside_a_live_run_of_the_same_instance(
    start_run: Callable[..., Run], own_redis: RedisServer, tmp_path: Path
) -> None:
    with start_run(f"127.0.0.1:{own_redis.port}") as run:
        wait_until_up(run)
        result = subprocess.run(
            [sys.executable, "manage.py", "run", "--no-web"],
            cwd=settings.BASE_DIR,
            env=run_env(tmp_path, free_port(), f"127.0.0.1:{own_redis.port}"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("CommandError")]
        assert len(errors) == 1, result.stderr
        assert f"already running here (pid {run.process.pid}" in errors[0]
        # The live run is untouched.
        assert login_page_answers(run.port)
        assert stop_with(run, signal.SIGTERM) == 0


def celery_status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "project", "status", "--timeout", "3"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_on_rabbitmq_needs_no_redis_and_another_worker_joins_with_one_command(
    start_run: Callable[..., Run], amqp_url: str, tmp_path: Path
) -> None:
    # Nothing answers at the default Redis address: were Redis needed, run would start one.
    default_redis = f"127.0.0.1:{free_port()}"
    with start_run(default_redis, BROKER_URL=amqp_url) as run:
        wait_until_up(run)
        output = run.output()
        assert re.search(
            r"broker \| using RabbitMQ \S+ at amqp://guest:\*\*\*@127.0.0.1:5672/", output
        )
        assert "Redis" not in output.replace("(enable -E", "")
        # Those alive now: a Redis started and gone would have said so in the output.
        assert not [p for p in run.alive_descendants() if "redis" in command_line(p)]
        (run.watch / "rabbit.jpg").write_bytes(jpeg_bytes())
        run.wait_for(
            "the image", lambda: image_statuses(run) == {"rabbit.jpg": "done"}, WORK_TIMEOUT
        )

        # Another host: the same environment and one command.
        joining = start_run(default_redis, "--only", "worker", name="joining", BROKER_URL=amqp_url)
        joining.wait_for("the worker", lambda: " ready." in joining.output(), START_TIMEOUT)
        assert "started worker" in joining.output()
        assert "started web" not in joining.output()
        assert "started beat" not in joining.output()
        env = {**run_env(tmp_path, run.port, default_redis), "BROKER_URL": amqp_url}
        status = celery_status(env)
        assert status.returncode == 0, status.stdout + status.stderr
        nodes = re.findall(r"->  (\S+): OK", status.stdout)
        assert len(set(nodes)) == 2, status.stdout
        assert "2 nodes online" in status.stdout
        assert "DuplicateNodename" not in status.stdout + status.stderr
        # The joining worker takes work too (the first one is told to stop taking any).
        first = next(node for node in nodes if f"{node} ready." in run.output())
        # With -d it returns on that node's reply; the default 1 s is short on a busy machine.
        control = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "project", "control", "cancel_consumer",
             f"parroter.{run_instance(run)}.images", "-d", first, "--timeout", "30"],
            cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert control.returncode == 0, control.stdout + control.stderr
        (run.watch / "second.jpg").write_bytes(jpeg_bytes(1))
        run.wait_for(
            "the second image",
            lambda: image_statuses(run).get("second.jpg") == "done",
            WORK_TIMEOUT,
        )
        assert re.search(r"Task jobs.make_thumbnails\[\S+\] received", joining.output())
        assert stop_with(joining, signal.SIGTERM) == 0
        assert stop_with(run, signal.SIGTERM) == 0


def run_instance(run: Run) -> str:
    found = re.search(r"instance (\S+): queues", run.output())
    assert found is not None
    return found[1]


@contextlib.contextmanager
def hanging_receiver() -> Iterator[str]:
    """A webhook URL whose server takes every connection and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"


def test_run_keeps_processing_images_while_a_webhook_receiver_hangs(
    start_run: Callable[..., Run],
) -> None:
    # Each webhook send waits up to 120 s on a receiver that never answers; with one pool
    # process (WORKER_CONCURRENCY=1) serving webhooks too, the images would wait as long.
    with (
        hanging_receiver() as url,
        start_run(f"127.0.0.1:{free_port()}", WEBHOOK_URL=url, WEBHOOK_TIMEOUT="120") as run,
    ):
        wait_until_up(run)
        run.wait_for("the webhook worker", lambda: "started webhooks (pid" in run.output(), 60)
        for number in range(6):
            (run.watch / f"photo-{number}.jpg").write_bytes(jpeg_bytes(number))
        run.wait_for(
            "all six images to be done",
            lambda: run.query("select count(*) from jobs_image where status = 'done'") == [(6,)],
            WORK_TIMEOUT,
        )
        sending = run.query("select count(*) from jobs_webhookdelivery where status = 'sending'")
        assert sending[0][0] >= 1, "the webhooks were being sent meanwhile, and hung"
        # /healthz's "workers" are the ones taking images: the webhook worker beats not.
        beating = [
            name for (name,) in run.query("select name from jobs_heartbeat where kind = 'worker'")
        ]
        assert len(beating) == 1, beating
        assert "-webhooks-" not in beating[0]
        assert "-webhooks-" in run.output()
        assert stop_with(run, signal.SIGINT) == 0
        assert run.survivors() == []

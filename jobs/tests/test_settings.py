"""Settings read from the environment: safe defaults, one-line errors, deploy checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from project.settings import (
    broker_url,
    database_from_url,
    instance_from_database,
    kept_secret_key,
)


def manage(*arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=settings.BASE_DIR,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SWEEP_INTERVAL", "soon"),
        ("SETTLE_SECONDS", "-1"),
        ("THUMBNAIL_SIZES", "128x128,huge"),
        ("DJANGO_DEBUG", "maybe"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("REDIS_URL", "http://localhost"),
        ("BROKER_URL", "http://localhost"),
        ("INSTANCE", "Two Words"),
        ("WORKER_EVENTS", "sometimes"),
        ("PORT", "eighty"),
        ("WEBHOOK_URL", "https://ok.example/hook,ftp://files.example/"),
        ("WORKER_MEMORY_MB", "64"),
        ("THUMBNAIL_FORMAT", "gif"),
        ("THUMBNAIL_FIT", "stretch"),
        ("THUMBNAIL_METADATA", "some"),
        ("SWEEP_INTERVAL", "nan"),
        ("HEALTH_TIMEOUT", "inf"),
        ("TIME_ZONE", "Mars/Olympus"),
        ("LOG_LEVEL", "verbose"),
        ("PORT", "70000"),
        ("DATABASE_URL", "postgres://user@db.example:99999/images"),
        # "now minus so many days" must stay a date, or retention stops with an OverflowError
        ("KEEP_ORIGINALS_DAYS", "1000000"),
        ("KEEP_ARCHIVES_DAYS", "1000000"),
        ("IDLE_SWEEP_DAYS", "1000000"),
        ("WEBHOOK_KEEP_DAYS", "1000000"),
        ("RESULT_EXPIRES_DAYS", "1000000"),
        ("UPLOAD_MAX_BYTES", str(200 * 1024 * 1024 + 1)),  # more than a worker reads
        ("JPEG_QUALITY", "200"),  # a sweep's quality is 1 to 95; Pillow clamps past 100
    ],
)
def test_settings_bad_value_stops_start_up_with_one_line_naming_it(variable, value):
    result = manage("check", **{variable: value})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error:")
    assert variable in lines[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "http://:R3dis-pw@cache.example:6379/0"),
        ("WEBHOOK_URL", "ftp://hookuser:R3dis-pw@files.example/"),
    ],
)
def test_settings_refused_url_is_named_without_its_password(variable, value):
    # Start-up errors end in journals and log collectors, read by more than the operator.
    result = manage("check", **{variable: value})
    assert result.returncode != 0
    assert variable in result.stderr
    assert "R3dis-pw" not in result.stderr
    assert ":***@" in result.stderr


def test_settings_check_deploy_is_clean_in_production_mode():
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_DEBUG="0",
        DJANGO_SECURE="1",
        DJANGO_SECRET_KEY="k" * 20 + "-production-secret-with-enough-entropy-0123456789",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_database_from_url_reads_sqlite_paths_relative_to_the_project():
    config = database_from_url("sqlite:///data/parroter.db")
    assert config["NAME"] == Path(settings.BASE_DIR) / "data" / "parroter.db"
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in config["OPTIONS"]["init_command"]
    assert database_from_url("sqlite:////var/lib/p.db")["NAME"] == Path("/var/lib/p.db")


def test_database_from_url_reads_postgres_credentials():
    config = database_from_url("postgres://me:p%40ss@db.example:6543/images?sslmode=require")
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["USER"], config["PASSWORD"], config["HOST"], config["PORT"]) == (
        "me",
        "p@ss",
        "db.example",
        "6543",
    )
    assert config["NAME"] == "images"
    assert config["OPTIONS"] == {"sslmode": "require"}


def test_database_from_url_refuses_a_url_without_a_name():
    with pytest.raises(ImproperlyConfigured, match="database name"):
        database_from_url("postgres://localhost")


def test_kept_secret_key_replaces_a_blank_file_left_by_a_crash(tmp_path):
    key_file = tmp_path / ".secret_key"
    key_file.write_text(" \n")
    key = kept_secret_key(key_file)
    assert len(key) >= 50
    assert key_file.read_text() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert kept_secret_key(key_file) == key  # kept, not made again
    assert [path.name for path in tmp_path.iterdir()] == [".secret_key"]  # no temporary left


# Waits for the starting gun, then reads or makes the key, like a process starting up.
FIRST_START = """
import sys, time
from pathlib import Path
from project.settings import kept_secret_key
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
print(kept_secret_key(Path(sys.argv[1])), flush=True)
"""


@pytest.mark.parametrize("left_by_a_crash", ["", "missing"])
def test_kept_secret_key_is_the_same_for_processes_starting_at_once(tmp_path, left_by_a_crash):
    key_file = tmp_path / ".secret_key"
    if left_by_a_crash == "":
        key_file.write_text("")
    go = tmp_path / "go"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_START, str(key_file), str(go)],
            cwd=settings.BASE_DIR,
            env={**os.environ, "DJANGO_SECRET_KEY": "not-this-one"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for start in starts:
        assert start.stdout.readline() == "ready\n"
    go.touch()
    keys = {start.communicate(timeout=60)[0].strip() for start in starts}
    assert all(start.returncode == 0 for start in starts)
    assert len(keys) == 1
    assert keys == {key_file.read_text()}
    assert len(key_file.read_text()) >= 50


def test_instance_from_database_tells_two_sqlite_checkouts_apart():
    first = instance_from_database(database_from_url("sqlite:////srv/one/db.sqlite3"))
    second = instance_from_database(database_from_url("sqlite:////srv/two/db.sqlite3"))
    assert first.startswith("db-")
    assert first != second
    assert first == instance_from_database(database_from_url("sqlite:////srv/one/db.sqlite3"))


def test_instance_from_database_is_the_postgres_name_whatever_the_host_is_called():
    by_name = instance_from_database(database_from_url("postgres://u@db.example/Images.Prod"))
    by_address = instance_from_database(database_from_url("postgres://u@10.0.0.5:5433/Images.Prod"))
    assert by_name == by_address == "images-prod"


def test_broker_url_prefers_broker_url_then_redis_url_then_what_make_run_wrote(
    monkeypatch, tmp_path
):
    written = tmp_path / "x.broker"
    written.write_text("redis://:secret@127.0.0.1:4242/0\n")
    default = "redis://127.0.0.1:6379/0"
    monkeypatch.delenv("BROKER_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert broker_url(written, default) == "redis://:secret@127.0.0.1:4242/0"
    assert broker_url(tmp_path / "missing.broker", default) == default
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    assert broker_url(written, "redis://cache:6379/2") == "redis://cache:6379/2"
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@rabbit:5672/parroter")
    assert broker_url(written, default) == "amqp://guest:guest@rabbit:5672/parroter"


def test_settings_name_queues_keys_and_exchanges_after_the_instance():
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.conf import settings as s; print(s.IMAGE_QUEUE, s.SWEEP_QUEUE, "
        "s.CELERY_BROKER_TRANSPORT_OPTIONS['global_keyprefix'], s.CELERY_CONTROL_EXCHANGE, "
        "s.CELERY_EVENT_EXCHANGE, s.CELERY_WORKER_SEND_TASK_EVENTS, s.CELERY_BROKER_URL)",
        INSTANCE="north",
        WORKER_EVENTS="1",
        BROKER_URL="amqp://guest:guest@127.0.0.1:5672//",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "parroter.north.images",
        "parroter.north.sweeps",
        "north:",
        "parroter.north.control",
        "parroter.north.events",
        "True",
        "amqp://guest:guest@127.0.0.1:5672//",
    ]


def test_check_folders_refuses_a_watch_folder_inside_media_root(tmp_path, settings):
    from django.core.checks import run_checks

    settings.MEDIA_ROOT = tmp_path / "media"
    settings.WATCH_FOLDER = tmp_path / "media" / "inbox"
    settings.WATCH_ROOTS = [settings.WATCH_FOLDER]
    assert [message.id for message in run_checks()] == ["parroter.E001"]
    settings.WATCH_FOLDER = tmp_path / "inbox"
    settings.WATCH_ROOTS = [settings.WATCH_FOLDER, tmp_path / "media" / "more"]
    errors = run_checks()
    assert [message.id for message in errors] == ["parroter.E001"]
    assert "WATCH_ROOTS" in errors[0].msg
    # A root holding MEDIA_ROOT is allowed: sweeps are refused folders overlapping it.
    settings.WATCH_ROOTS = [settings.WATCH_FOLDER, tmp_path]
    assert run_checks() == []


def test_manage_check_stops_on_overlapping_folders(tmp_path):
    result = manage("check", MEDIA_ROOT=str(tmp_path), WATCH_FOLDER=str(tmp_path / "in"))
    assert result.returncode != 0
    assert "parroter.E001" in result.stderr


# Kept away from the test's raise: the debug page quotes the code around each frame's line.
SECRET_URLS = {
    "REDIS_URL": "redis://:redis-pass@cache.example:6379/0",
    "BROKER_URL": "amqp://guest:amqp-pass@rabbit.example:5672//",
    "WEBHOOK_URLS": ["https://hooks:hook-pass@receiver.example/in", "https://plain/"],
}
ENVIRONMENT_URL = "redis://:env-pass@cache.example:6379/0"
PASSWORDS = ("redis-pass", "amqp-pass", "hook-pass", "env-pass")


def test_error_reports_mask_passwords_in_url_settings_and_the_environment(rf, settings):
    """Django hides settings by name; a password inside a URL setting, or in the environment
    a development server hands each request, is masked on the debug page and in e-mails."""
    import sys as system

    from django.views.debug import ExceptionReporter

    settings.DEBUG = True
    # Not a loop here: the debug page shows each frame's variables, a loop's last value too.
    settings.REDIS_URL, settings.BROKER_URL, settings.WEBHOOK_URLS = SECRET_URLS.values()
    request = rf.get("/", REDIS_URL=ENVIRONMENT_URL)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        reporter = ExceptionReporter(request, *system.exc_info())
    for page in (reporter.get_traceback_text(), reporter.get_traceback_html()):
        assert not [password for password in PASSWORDS if password in page]
        assert "guest:***@rabbit.example" in page
        assert "hooks:***@receiver.example" in page
        assert "https://plain/" in page


def test_error_reports_mask_every_password_of_a_url_list_in_the_environment(rf, settings):
    """WEBHOOK_URL holds several URLs, comma-separated (envurls): as a development server
    hands it to each request, every one of their passwords is masked, not the first only."""
    from project.reporting import ExceptionReporterFilter

    settings.DEBUG = True
    listed = "https://one:first-pass@a.example/in, https://two:second-pass@b.example/in"
    request = rf.get("/", WEBHOOK_URL=listed)
    shown = ExceptionReporterFilter().get_safe_request_meta(request)["WEBHOOK_URL"]
    assert "second-pass" not in shown
    assert shown == "https://one:***@a.example/in, https://two:***@b.example/in"
    one = ExceptionReporterFilter().cleanse_setting("REDIS_URL", "redis://:comma,pass@h:6379/0")
    assert one == "redis://:***@h:6379/0"

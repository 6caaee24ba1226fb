"""Settings read from the environment: safe defaults, one-line errors, deploy checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from project.settings import database_from_url


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
        ("PORT", "eighty"),
        ("WORKER_MEMORY_MB", "64"),
    ],
)
def test_settings_bad_value_stops_start_up_with_one_line_naming_it(variable, value):
    result = manage("check", **{variable: value})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error:")
    assert variable in lines[0]


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

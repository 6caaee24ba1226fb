"""Parroter settings: every knob is read from the environment, with safe defaults.

A bad value stops start-up with ImproperlyConfigured naming the variable; `manage.py`
turns that into a single line.
"""

import fcntl
import hashlib
import importlib.util
import math
import os
import re
import secrets
import sys
import tempfile
import zoneinfo
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from jobs.logs import escape_log_arguments
from jobs.pipeline import FIT_CHOICES, FORMAT_CHOICES, METADATA_CHOICES, parse_sizes
from jobs.redis_server import redact

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def envint(name: str, default: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    value = os.environ.get(name, default)
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {number}")
    return number


# Days of a retention: "now minus this" must stay a date (0, where allowed, is forever).
MAX_DAYS = 36500


def envfloat(name: str, default: str, *, minimum: float = 0.0) -> float:
    value = os.environ.get(name, default)
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ImproperlyConfigured(f"{name} must be a finite number, got {value!r}")
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def project_path(value: str | Path) -> Path:
    # Relative paths are relative to the project, never to the current directory.
    path = Path(value).expanduser()
    return (path if path.is_absolute() else BASE_DIR / path).resolve()


def envpath(name: str, default: Path) -> Path:
    return project_path(os.environ.get(name) or default)


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def envurls(name: str) -> list[str]:
    urls = envlist(name, "")
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            # Redacted: start-up errors reach journals and log collectors.
            raise ImproperlyConfigured(
                f"{name} must list http:// or https:// URLs, got {redact(url)!r}"
            )
    return urls


# Seconds a database connection is kept for the next request or task (Django's
# CONN_MAX_AGE); one that fails is dropped at once.
CONN_MAX_AGE = 60


def database_from_url(url: str) -> dict:
    """Translate a DATABASE_URL (sqlite:///path or postgres://...) into Django's form."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    if parts.scheme == "sqlite":
        # sqlite:///relative.db is relative to the project, sqlite:////abs.db absolute.
        raw = unquote(parts.path)[1:] if parts.path.startswith("/") else unquote(parts.path)
        if not raw:
            raise ImproperlyConfigured("DATABASE_URL sqlite URL needs a file path")
        name = Path(raw) if Path(raw).is_absolute() else BASE_DIR / raw
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name,
            # Web, beat and several workers share one file: WAL lets readers run beside the
            # writer, IMMEDIATE takes the write lock up front (no deadlock on upgrade), and
            # the timeout makes a busy database wait instead of failing.
            "OPTIONS": {
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
                ),
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            "TEST": {"NAME": str(name.with_name(f"test_{name.name}"))},
            # Kept between requests and tasks (jobs/worker.py): opening one, with Django's
            # functions registered and the pragmas above, costs ~0.8 ms CPU.
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ImproperlyConfigured("DATABASE_URL postgres URL needs a database name")
        try:
            port = parts.port
        except ValueError as exc:
            raise ImproperlyConfigured(f"DATABASE_URL has a bad port: {exc}") from None
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            # A new PostgreSQL connection costs ~6.5 ms, a backend process started for it.
            "CONN_MAX_AGE": CONN_MAX_AGE,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": options,
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL scheme must be sqlite:// or postgres://, got {parts.scheme!r}"
    )


REDIS_SCHEMES = ("redis", "rediss", "unix")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
INSTANCE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")


def instance_from_database(database: dict) -> str:
    """A default instance name: the PostgreSQL database's, or the SQLite file's and its path.

    Two checkouts with the default SQLite file get different names (its absolute path is
    part of it); every host of one PostgreSQL instance gets the same, however it names the
    server.
    """
    name = Path(database["NAME"])
    if database["ENGINE"].endswith("sqlite3"):
        digest = hashlib.sha256(str(name.resolve()).encode()).hexdigest()[:8]
        raw = f"{name.stem}-{digest}"
    else:
        raw = str(database["NAME"])
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")[:48].strip("-_")
    return cleaned or "parroter"


def broker_url(url_file: Path, redis_url: str) -> str:
    """BROKER_URL; else an explicit REDIS_URL; else the URL `make run` wrote; else REDIS_URL."""
    if value := os.environ.get("BROKER_URL", "").strip():
        return value
    if os.environ.get("REDIS_URL", "").strip():
        return redis_url
    try:
        return url_file.read_text().strip() or redis_url
    except OSError:
        return redis_url


def secret_key() -> str:
    """DJANGO_SECRET_KEY, or a random key generated once and kept beside the project."""
    return os.environ.get("DJANGO_SECRET_KEY") or kept_secret_key(BASE_DIR / ".secret_key")


def kept_secret_key(key_file: Path) -> str:
    """The key kept in `key_file`, made on first use; processes starting at once agree on it.

    An empty or blank file (a crash mid-write) counts as missing, never as an empty key. A
    new key is written under a temporary name, fsynced and renamed into place under a lock
    on the folder: a reader sees a whole key or none, and two first starts make one key.
    """
    if key := _read_key(key_file):
        return key
    folder = os.open(key_file.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if key := _read_key(key_file):
            return key  # another process made it while this one waited
        key = secrets.token_urlsafe(50)
        fd, temporary = tempfile.mkstemp(dir=key_file.parent, prefix=f".{key_file.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(key)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, key_file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        os.fsync(folder)
        return key
    finally:
        os.close(folder)  # and with it the lock


def _read_key(key_file: Path) -> str:
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        return ""


DEBUG = envbool("DJANGO_DEBUG", "0")
# Error pages and e-mails show URL settings with their passwords masked (project/reporting.py).
DEFAULT_EXCEPTION_REPORTER_FILTER = "project.reporting.ExceptionReporterFilter"
SECRET_KEY = secret_key()
ALLOWED_HOSTS = envlist("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("DJANGO_CSRF_TRUSTED_ORIGINS", "")
# Behind HTTPS, set DJANGO_SECURE=1: secure cookies, HSTS and redirect to https.
SECURE = envbool("DJANGO_SECURE", "0")
SESSION_COOKIE_SECURE = SECURE
CSRF_COOKIE_SECURE = SECURE
SECURE_SSL_REDIRECT = SECURE
SECURE_HSTS_SECONDS = 31536000 if SECURE else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE
SECURE_HSTS_PRELOAD = SECURE
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if SECURE else None
# Probes and scrapers often speak plain HTTP to the process itself; a redirect fails them.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "django_celery_results",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Refuses oversized or anonymous uploads from their headers: its process_view must run
    # before CSRF's, which reads (and so stores) the whole body.
    "jobs.upload_limits.BodyLimitMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The admin's site-wide look (favicon, base template); app templates live in apps.
        "DIRS": [BASE_DIR / "project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": database_from_url(envstr("DATABASE_URL", "sqlite:///db.sqlite3"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = envstr("TIME_ZONE", "UTC")
try:
    zoneinfo.ZoneInfo(TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError):
    raise ImproperlyConfigured(
        f"TIME_ZONE must be an IANA time zone name (Europe/Paris), got {TIME_ZONE!r}"
    ) from None
USE_I18N = True
USE_TZ = True
# Times everywhere as 2026-11-28 08:05:13: seconds matter when sweeps run every few seconds.
FORMAT_MODULE_PATH = ["project.formats"]

STATIC_URL = "static/"
# WhiteNoise serves static files straight from the apps (indexed once at start-up), so no
# collectstatic step is needed; set STATIC_ROOT only to collect them for another server.
STATIC_ROOT = (
    envpath("STATIC_ROOT", BASE_DIR / "staticfiles") if os.environ.get("STATIC_ROOT") else None
)
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LOGIN_URL = "jobs:login"

# --- Parroter ---------------------------------------------------------------------------

WATCH_FOLDER = envpath("WATCH_FOLDER", BASE_DIR / "watch_folder")
MEDIA_ROOT = envpath("MEDIA_ROOT", BASE_DIR / "media")
# Archives and previews are served by staff-only views, never as public media.
MEDIA_URL = None
# Folders a sweep may be pointed at (the watch folder and anything below these roots).
# Anyone who can edit a periodic task's kwargs can name a folder: this bounds the damage.
WATCH_ROOTS = [WATCH_FOLDER] + [project_path(item) for item in envlist("WATCH_ROOTS", "")]
PORT = envint("PORT", "8000", minimum=1, maximum=65535)
# The address `make run`'s web server listens on; 0.0.0.0 to be reached from other machines.
DJANGO_BIND = envstr("DJANGO_BIND", "127.0.0.1").strip() or "127.0.0.1"
SWEEP_INTERVAL = envfloat("SWEEP_INTERVAL", "10", minimum=1)
SETTLE_SECONDS = envfloat("SETTLE_SECONDS", "2")
# Beat also sweeps WATCH_FOLDER as soon as a local writer finishes a file (Linux inotify):
# at once for a file renamed in (whole when it appears), SETTLE_SECONDS after one written in
# place, instead of up to SWEEP_INTERVAL later; the periodic sweep stays the guarantee. On by
# default where there is inotify.
WATCH_EVENTS = envbool("WATCH_EVENTS", "true" if sys.platform.startswith("linux") else "false")
try:
    THUMBNAIL_SIZES = [size.label for size in parse_sizes(envlist("THUMBNAIL_SIZES", ""))] or [
        "128x128",
        "256x256",
        "512x512",
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"THUMBNAIL_SIZES: {exc}") from None
# As a sweep's own quality (sweeper.MAX_QUALITY): above 95 Pillow's JPEGs grow much larger
# for hardly any gain, and past 100 it clamps without a word.
JPEG_QUALITY = envint("JPEG_QUALITY", "85", minimum=1, maximum=95)
# The output preset of sweeps that do not choose one (the settings' sweep, uploads).
# Thumbnails' format: same (the input's family; phone photos become JPEG), jpeg, webp, avif.
THUMBNAIL_FORMAT = envstr("THUMBNAIL_FORMAT", "same").strip().lower() or "same"
# contain: inside the box, aspect kept; cover: exactly the box, cut around the centre.
THUMBNAIL_FIT = envstr("THUMBNAIL_FIT", "contain").strip().lower() or "contain"
# strip: no EXIF/XMP in thumbnails; keep: who, with what and when (never GPS).
THUMBNAIL_METADATA = envstr("THUMBNAIL_METADATA", "strip").strip().lower() or "strip"
for _name, _choices in (
    ("THUMBNAIL_FORMAT", FORMAT_CHOICES),
    ("THUMBNAIL_FIT", FIT_CHOICES),
    ("THUMBNAIL_METADATA", METADATA_CHOICES),
):
    if globals()[_name] not in _choices:
        raise ImproperlyConfigured(
            f"{_name} must be one of {', '.join(_choices)}, got {globals()[_name]!r}"
        )
# PNG and WebP decoded and shrunk to the first thumbnail by libvips, after Pillow has
# identified the file and checked its limits, and Lanczos resizes of 8-bit images run
# there: a fifth to a third less CPU, and a fraction of the memory for large WebPs
# (bench/README.md). Off: Pillow does everything.
LIBVIPS_DECODE = envbool("LIBVIPS_DECODE", "true")
if LIBVIPS_DECODE and importlib.util.find_spec("pyvips") is None:
    raise ImproperlyConfigured(
        "LIBVIPS_DECODE needs pyvips and pyvips-binary (requirements.txt), not installed"
    )
# Images above this many pixels are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = envint("MAX_IMAGE_PIXELS", "200000000", minimum=1)
MAX_IMAGE_BYTES = envint("MAX_IMAGE_BYTES", str(200 * 1024 * 1024), minimum=1)
IMAGE_SOFT_TIME_LIMIT = envint("IMAGE_SOFT_TIME_LIMIT", "120", minimum=1)
IMAGE_TIME_LIMIT = envint("IMAGE_TIME_LIMIT", "150", minimum=2)
# A file whose processing dies this many times (poison file) is failed, not retried forever.
MAX_ATTEMPTS = envint("MAX_ATTEMPTS", "3", minimum=1)
# A running image renews its lease (database clock) every third of this; once it runs out,
# the next sweep on any host retries the image.
LEASE_SECONDS = envfloat("LEASE_SECONDS", "30", minimum=1)
# A queued image with no progress for this long is assumed lost with its message and requeued.
REQUEUE_AFTER = envint("REQUEUE_AFTER", "60", minimum=1)
RECOVER_INTERVAL = max(SWEEP_INTERVAL, 10.0)
# Sweep records that claimed nothing (idle scheduled sweeps leave none) go after this many days.
IDLE_SWEEP_DAYS = envint("IDLE_SWEEP_DAYS", "7", minimum=1, maximum=MAX_DAYS)
# Kept originals and archives of finished images are deleted after this many days (the
# image's record stays); 0 keeps them forever.
KEEP_ORIGINALS_DAYS = envint("KEEP_ORIGINALS_DAYS", "0", maximum=MAX_DAYS)
KEEP_ARCHIVES_DAYS = envint("KEEP_ARCHIVES_DAYS", "0", maximum=MAX_DAYS)
# Below this much free space where MEDIA_ROOT lives, sweeps claim nothing and say why,
# uploads are refused (507), and /healthz reports the disk (MEDIA_ROOT's or a watch folder's).
MIN_FREE_MB = envint("MIN_FREE_MB", "500")
UPLOAD_MAX_FILES = envint("UPLOAD_MAX_FILES", "20", minimum=1)
# No more than a worker reads (MAX_IMAGE_BYTES): a larger upload would be taken, then fail.
UPLOAD_MAX_BYTES = envint(
    "UPLOAD_MAX_BYTES", str(MAX_IMAGE_BYTES), minimum=1, maximum=MAX_IMAGE_BYTES
)
# Django's own cap on files per request, one above ours so that the upload says it in words.
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES + 1
# Where uploads over 2.5 MB are spooled while the request is read (unset: the system's).
FILE_UPLOAD_TEMP_DIR = (
    str(envpath("FILE_UPLOAD_TEMP_DIR", BASE_DIR))
    if os.environ.get("FILE_UPLOAD_TEMP_DIR")
    else None
)
# `make run` waits this long for a REDIS_URL that does not answer yet, then gives up.
REDIS_WAIT = envfloat("REDIS_WAIT", "30")
# A worker that starts nothing for this long while work waits is restarted by `make run`.
STALL_SECONDS = envfloat("STALL_SECONDS", str(IMAGE_TIME_LIMIT + 60), minimum=1)
WORKER_CONCURRENCY = envint("WORKER_CONCURRENCY", str(os.cpu_count() or 1), minimum=1)
# How often beat (on its ticks) and each worker record in the database that they are alive.
HEARTBEAT_SECONDS = envfloat("HEARTBEAT_SECONDS", "5", minimum=0.5)
# Seconds /healthz waits for all its probes together; a probe still running then has failed.
# Measured, its worst answer of 30 on a busy 2-core machine took 117 ms (PostgreSQL): a
# deadline near that would fail a healthy system whenever the host is loaded.
HEALTH_TIMEOUT = envfloat("HEALTH_TIMEOUT", "1", minimum=0.01)
# Bearer token for /metrics; empty: /metrics answers requests from loopback only.
METRICS_TOKEN = envstr("METRICS_TOKEN", "")
# URLs (comma-separated) sent one signed POST per image that reaches a final state.
WEBHOOK_URLS = envurls("WEBHOOK_URL")
# Which events they are told of (comma-separated): each image's final state, and one digest
# per sweep (or upload) once every image it claimed is final.
WEBHOOK_EVENT_NAMES = ("image.done", "image.failed", "image.duplicate", "sweep.finished")
WEBHOOK_EVENTS = envlist("WEBHOOK_EVENTS", ",".join(WEBHOOK_EVENT_NAMES))
if unknown_events := sorted(set(WEBHOOK_EVENTS) - set(WEBHOOK_EVENT_NAMES)):
    raise ImproperlyConfigured(
        f"WEBHOOK_EVENTS names unknown events {unknown_events}; "
        f"known: {', '.join(WEBHOOK_EVENT_NAMES)}"
    )
# Key of the X-Parroter-Signature HMAC; empty: webhooks are sent unsigned.
WEBHOOK_SECRET = envstr("WEBHOOK_SECRET", "")
# Seconds a webhook request may take before it counts as failed (and is retried).
WEBHOOK_TIMEOUT = envfloat("WEBHOOK_TIMEOUT", "10", minimum=0.1)
# Seconds before the first retry of a failed webhook; doubled for each later one, up to an
# hour between tries.
WEBHOOK_BACKOFF = envfloat("WEBHOOK_BACKOFF", "10", minimum=0.1)
# Tries of one webhook, the first included, before it is failed for good: with the defaults
# 30 tries cover about 21 hours, so a receiver down overnight still gets every event.
WEBHOOK_TRIES = envint("WEBHOOK_TRIES", "30", minimum=1)
# Days sent and failed webhook deliveries stay in the outbox (the admin's Webhook
# deliveries); 0 keeps them forever.
WEBHOOK_KEEP_DAYS = envint("WEBHOOK_KEEP_DAYS", "30", maximum=MAX_DAYS)
# MB (MiB) of memory no worker process exceeds: images that would not fit are refused from
# their header, and an OS limit stops a pool process that goes over anyway (jobs/worker.py).
WORKER_MEMORY_MB = envint("WORKER_MEMORY_MB", "512", minimum=128)
if IMAGE_SOFT_TIME_LIMIT >= IMAGE_TIME_LIMIT:
    raise ImproperlyConfigured("IMAGE_SOFT_TIME_LIMIT must be below IMAGE_TIME_LIMIT")

# --- Celery -----------------------------------------------------------------------------

# This installation's name on a shared broker: its queues, Redis keys, exchanges and worker
# names carry it, so two instances on one Redis database or RabbitMQ vhost never exchange
# work. Every web, worker and beat process of one instance must agree on it, which the
# default (from the database, the one thing they must share anyway) makes sure of.
INSTANCE = envstr("INSTANCE", "") or instance_from_database(DATABASES["default"])
if not INSTANCE_PATTERN.fullmatch(INSTANCE):
    raise ImproperlyConfigured(
        f"INSTANCE must be 1-48 lowercase letters, digits, '-' or '_', got {INSTANCE!r}"
    )
# Where `make run` keeps its pid file and the broker URL it chose (for `celery -A project`).
RUN_DIR = envpath("RUN_DIR", BASE_DIR / "var")
BROKER_URL_FILE = RUN_DIR / f"{INSTANCE}.broker"

REDIS_URL = envstr("REDIS_URL", "redis://127.0.0.1:6379/0")
if urlsplit(REDIS_URL).scheme not in REDIS_SCHEMES:
    raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL, got {redact(REDIS_URL)!r}")
# Redis or RabbitMQ (amqp://). Unset: REDIS_URL if set, else what `make run` chose (its
# bundled Redis, say), else REDIS_URL's default.
BROKER_URL = broker_url(BROKER_URL_FILE, REDIS_URL)
if urlsplit(BROKER_URL).scheme not in REDIS_SCHEMES + AMQP_SCHEMES:
    raise ImproperlyConfigured(
        f"BROKER_URL must be a redis:// or amqp:// URL, got {urlsplit(BROKER_URL).scheme!r}"
    )
# `make run` waits this long for a configured broker that does not answer yet.
BROKER_WAIT = envfloat("BROKER_WAIT", str(REDIS_WAIT))

CELERY_BROKER_URL = BROKER_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # With acks_late an unacknowledged message returns after this long; keep it far above
    # the hard time limit so a slow image is never delivered twice while it still runs.
    "visibility_timeout": max(3600, IMAGE_TIME_LIMIT * 10),
    # Every Redis key of this instance (queues, unacked messages, bindings) starts with it.
    "global_keyprefix": f"{INSTANCE}:",
    # A Redis that stops answering without closing the connection (frozen, failed over, a
    # dropped route) would hold a publish forever: an upload's request, a sweep's queueing.
    "socket_timeout": 5,
}
# Queues of our own, so a broker shared with another Celery app or another instance mixes no
# messages, and sweeps never wait behind a backlog of images (a worker serves both queues).
IMAGE_QUEUE = f"parroter.{INSTANCE}.images"
# Uploaded images, which someone watches on the upload page: a worker takes from its queues in
# turn (kombu's round robin on Redis, RabbitMQ's own), so an upload waits for the images
# being processed, not behind a whole folder's backlog.
UPLOAD_QUEUE = f"parroter.{INSTANCE}.uploads"
IMAGE_QUEUES = (IMAGE_QUEUE, UPLOAD_QUEUE)
SWEEP_QUEUE = f"parroter.{INSTANCE}.sweeps"
# Webhooks wait behind neither a backlog of images nor a slow receiver's retries of theirs.
WEBHOOK_QUEUE = f"parroter.{INSTANCE}.webhooks"
# Remote control (`celery status`, `inspect`) and events (Flower) of this instance only.
CELERY_CONTROL_EXCHANGE = f"parroter.{INSTANCE}.control"
CELERY_EVENT_EXCHANGE = f"parroter.{INSTANCE}.events"
# Task events for Flower and `celery events`; off by default (a message per task state).
WORKER_EVENTS = envbool("WORKER_EVENTS", "0")
CELERY_WORKER_SEND_TASK_EVENTS = WORKER_EVENTS
CELERY_TASK_SEND_SENT_EVENT = WORKER_EVENTS
CELERY_TASK_DEFAULT_QUEUE = IMAGE_QUEUE
# Each queue on an exchange and routing key of its own: without them Celery binds every queue
# to the default queue's exchange and key, and a message sent there lands in both queues.
CELERY_TASK_QUEUES = (
    Queue(UPLOAD_QUEUE, Exchange(UPLOAD_QUEUE), routing_key=UPLOAD_QUEUE),
    Queue(IMAGE_QUEUE, Exchange(IMAGE_QUEUE), routing_key=IMAGE_QUEUE),
    Queue(SWEEP_QUEUE, Exchange(SWEEP_QUEUE), routing_key=SWEEP_QUEUE),
    Queue(WEBHOOK_QUEUE, Exchange(WEBHOOK_QUEUE), routing_key=WEBHOOK_QUEUE),
)
CELERY_TASK_ROUTES = {
    "jobs.sweep_folder": {"queue": SWEEP_QUEUE},
    "jobs.recover": {"queue": SWEEP_QUEUE},
    "jobs.deliver_webhook": {"queue": WEBHOOK_QUEUE},
    "jobs.repair_webhooks": {"queue": WEBHOOK_QUEUE},
    "jobs.apply_retention": {"queue": SWEEP_QUEUE},
}
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = timedelta(
    days=envint("RESULT_EXPIRES_DAYS", "30", minimum=1, maximum=MAX_DAYS)
)
CELERY_CACHE_BACKEND = "django-cache"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
# The STARTED row names the worker node running a task (the image's own row names only
# host:pid). It costs each task one database write: 1.5 ms CPU, measured on SQLite.
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_ACKS_LATE = True
# Celery closes every database connection after each task unless told to keep them for
# this many tasks; jobs/worker.py closes the broken or old ones itself, as Django does
# after each request (CONN_MAX_AGE, CONN_HEALTH_CHECKS).
CELERY_DB_REUSE_MAX = 1000
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CONCURRENCY = WORKER_CONCURRENCY
# A pool process whose peak memory came within 10% of WORKER_MEMORY_MB is replaced after its
# task (KiB), so a process that crept up (a leak, a fragmented heap) starts afresh.
CELERY_WORKER_MAX_MEMORY_PER_CHILD = WORKER_MEMORY_MB * 1024 * 9 // 10
# A run cut off by a broker blip would count as a failed attempt; letting it finish is
# harmless, since a redelivered message finds its image no longer pending.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TIMEZONE = TIME_ZONE
# django-celery-beat's DatabaseScheduler, plus marking settings-owned rows (jobs/beat.py).
CELERY_BEAT_SCHEDULER = "jobs.beat:Scheduler"


def expiring_before_next(period: float) -> dict[str, int]:
    """Beat options for a task worthless once the next one is due, so that a backlog left
    by stopped workers is dropped, not run: django-celery-beat keeps a settings entry's
    expiry only as whole seconds (`expire_seconds`), and drops `expires`."""
    return {"expire_seconds": max(1, int(period * 0.9))}


# Settings-owned schedules. Beat writes these rows on every start; see the README for how
# they live beside the periodic tasks made in the admin.
CELERY_BEAT_SCHEDULE = {
    "sweep-watch-folder": {
        "task": "jobs.sweep_folder",
        "schedule": SWEEP_INTERVAL,
        "kwargs": {"folder": str(WATCH_FOLDER), "sizes": THUMBNAIL_SIZES},
        "options": expiring_before_next(SWEEP_INTERVAL),
    },
    # Uploads and reprocessed images are read from MEDIA_ROOT, which no sweep lists: this
    # repairs them after a dead worker or a lost message, as a sweep does for its folder.
    "recover-uploads-and-reprocessing": {
        "task": "jobs.recover",
        "schedule": RECOVER_INTERVAL,
        "options": expiring_before_next(RECOVER_INTERVAL),
    },
    # KEEP_ORIGINALS_DAYS and KEEP_ARCHIVES_DAYS, and forgetting idle sweep records.
    "apply-retention": {
        "task": "jobs.apply_retention",
        "schedule": 3600,
        "options": expiring_before_next(3600),
    },
}
if WEBHOOK_URLS:
    # Sends again the webhooks whose message or worker was lost (jobs/webhooks.py).
    CELERY_BEAT_SCHEDULE["repair-webhooks"] = {
        "task": "jobs.repair_webhooks",
        "schedule": RECOVER_INTERVAL,
        "options": expiring_before_next(RECOVER_INTERVAL),
    }

# File names and other outside text reach log lines as arguments: their control characters
# are escaped, so no name can forge a line. Set per process, so Celery's handlers get it too.
escape_log_arguments()
LOG_LEVEL = envstr("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {LOG_LEVEL!r}"
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # libvips reports every resize and thread pool it runs at INFO: a dozen lines an
        # image. Its warnings and errors still come through.
        "pyvips": {"level": "WARNING"},
    },
}

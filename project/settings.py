"""Parroter settings: every knob is read from the environment, with safe defaults.

A bad value stops start-up with ImproperlyConfigured naming the variable; `manage.py`
turns that into a single line.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

from jobs.pipeline import parse_sizes

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


def envint(name: str, default: str, *, minimum: int = 0) -> int:
    value = os.environ.get(name, default)
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def envfloat(name: str, default: str, *, minimum: float = 0.0) -> float:
    value = os.environ.get(name, default)
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
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
        }
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured("DATABASE_URL postgres URL needs a database name")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": options,
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL scheme must be sqlite:// or postgres://, got {parts.scheme!r}"
    )


def secret_key() -> str:
    """DJANGO_SECRET_KEY, or a random key generated once and kept beside the project."""
    if value := os.environ.get("DJANGO_SECRET_KEY"):
        return value
    key_file = BASE_DIR / ".secret_key"
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(50)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        return key


DEBUG = envbool("DJANGO_DEBUG", "0")
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
        "DIRS": [],
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
USE_I18N = True
USE_TZ = True

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
PORT = envint("PORT", "8000", minimum=1)
SWEEP_INTERVAL = envfloat("SWEEP_INTERVAL", "10", minimum=1)
SETTLE_SECONDS = envfloat("SETTLE_SECONDS", "2")
try:
    THUMBNAIL_SIZES = [size.label for size in parse_sizes(envlist("THUMBNAIL_SIZES", ""))] or [
        "128x128",
        "256x256",
        "512x512",
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"THUMBNAIL_SIZES: {exc}") from None
JPEG_QUALITY = envint("JPEG_QUALITY", "85", minimum=1)
# Images above this many pixels are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = envint("MAX_IMAGE_PIXELS", "200000000", minimum=1)
MAX_IMAGE_BYTES = envint("MAX_IMAGE_BYTES", str(200 * 1024 * 1024), minimum=1)
IMAGE_SOFT_TIME_LIMIT = envint("IMAGE_SOFT_TIME_LIMIT", "120", minimum=1)
IMAGE_TIME_LIMIT = envint("IMAGE_TIME_LIMIT", "150", minimum=2)
# A file whose processing dies this many times (poison file) is failed, not retried forever.
MAX_ATTEMPTS = envint("MAX_ATTEMPTS", "3", minimum=1)
# A queued image with no progress for this long is assumed lost with its message and requeued.
REQUEUE_AFTER = envint("REQUEUE_AFTER", "60", minimum=1)
RECOVER_INTERVAL = max(SWEEP_INTERVAL, 10.0)
# Sweeps that found nothing to do are forgotten after this many days.
IDLE_SWEEP_DAYS = envint("IDLE_SWEEP_DAYS", "7", minimum=1)
UPLOAD_MAX_FILES = envint("UPLOAD_MAX_FILES", "20", minimum=1)
UPLOAD_MAX_BYTES = envint("UPLOAD_MAX_BYTES", str(MAX_IMAGE_BYTES), minimum=1)
# `make run` waits this long for a REDIS_URL that does not answer yet, then gives up.
REDIS_WAIT = envfloat("REDIS_WAIT", "30")
# A worker that starts nothing for this long while work waits is restarted by `make run`.
STALL_SECONDS = envfloat("STALL_SECONDS", str(IMAGE_TIME_LIMIT + 60), minimum=1)
WORKER_CONCURRENCY = envint("WORKER_CONCURRENCY", str(os.cpu_count() or 1), minimum=1)
# MB (MiB) of memory no worker process exceeds: images that would not fit are refused from
# their header, and an OS limit stops a pool process that goes over anyway (jobs/worker.py).
WORKER_MEMORY_MB = envint("WORKER_MEMORY_MB", "512", minimum=128)
if IMAGE_SOFT_TIME_LIMIT >= IMAGE_TIME_LIMIT:
    raise ImproperlyConfigured("IMAGE_SOFT_TIME_LIMIT must be below IMAGE_TIME_LIMIT")

# --- Celery -----------------------------------------------------------------------------

REDIS_URL = envstr("REDIS_URL", "redis://127.0.0.1:6379/0")
if urlsplit(REDIS_URL).scheme not in ("redis", "rediss", "unix"):
    raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL, got {REDIS_URL!r}")

CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# With acks_late an unacknowledged message returns after this long; keep it far above the
# hard time limit so a slow image is never delivered twice while it still runs.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": max(3600, IMAGE_TIME_LIMIT * 10)}
# Queues of our own, so a Redis shared with another Celery app mixes no messages, and sweeps
# never wait behind a backlog of images (a worker serves both queues).
IMAGE_QUEUE = "parroter.images"
SWEEP_QUEUE = "parroter.sweeps"
CELERY_TASK_DEFAULT_QUEUE = IMAGE_QUEUE
CELERY_TASK_QUEUES = (Queue(IMAGE_QUEUE), Queue(SWEEP_QUEUE))
CELERY_TASK_ROUTES = {
    "jobs.sweep_folder": {"queue": SWEEP_QUEUE},
    "jobs.recover": {"queue": SWEEP_QUEUE},
}
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = timedelta(days=envint("RESULT_EXPIRES_DAYS", "30", minimum=1))
CELERY_CACHE_BACKEND = "django-cache"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_ACKS_LATE = True
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
# Settings-owned schedules. Beat writes these rows on every start; see the README for how
# they live beside the periodic tasks made in the admin.
CELERY_BEAT_SCHEDULE = {
    "sweep-watch-folder": {
        "task": "jobs.sweep_folder",
        "schedule": SWEEP_INTERVAL,
        "kwargs": {"folder": str(WATCH_FOLDER), "sizes": THUMBNAIL_SIZES},
        # A sweep that could not start before the next one is due is worthless.
        "options": {"expires": SWEEP_INTERVAL * 0.9},
    },
    # Uploads and reprocessed images are read from MEDIA_ROOT, which no sweep lists: this
    # repairs them after a dead worker or a lost message, as a sweep does for its folder.
    "recover-uploads-and-reprocessing": {
        "task": "jobs.recover",
        "schedule": RECOVER_INTERVAL,
        "options": {"expires": RECOVER_INTERVAL * 0.9},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

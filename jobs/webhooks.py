"""Webhooks: one signed POST per image that reaches a final state, and one digest per sweep
once all its images are final, each sent exactly once.

Order of effects, so that a crash anywhere neither loses nor repeats an event: the image's
final state and one `WebhookDelivery` row per URL are committed together (`record`); only
after the commit is a task queued for each row. The task claims its row by a conditional
update (pending -> sending), so two workers never send the same row; it records the answer
and, on a connection error, a timeout or a 5xx, puts the row back to pending for a later
try (408 and 429 too, after the receiver's Retry-After). `repair` (a beat entry) queues
again the rows whose message or worker was lost, and those waiting longer than a message may.

One crash window is left, as in any webhook system: a worker that dies after the receiver
got the POST but before the row says "sent" makes the row be sent again. Every request
carries `X-Parroter-Delivery` (the row's id), stable across tries, for receivers to ignore
a repeat.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit

import kombu.exceptions
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Max, Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from .models import Image, Sweep, WebhookDelivery

logger = logging.getLogger(__name__)

DELIVER_TASK = "jobs.deliver_webhook"
# The longest wait between two tries: the backoff doubles up to this, and a receiver's
# Retry-After is followed up to this.
MAX_BACKOFF = 3600.0
# The longest wait a retry's message carries (its countdown). A message held longer by a
# worker outlives Redis' visibility timeout or RabbitMQ's consumer timeout; a longer wait is
# left to `repair`, which sends rows due by REQUEUE_AFTER.
MAX_COUNTDOWN = 300.0
# Answers that mean "not now" rather than "never": timed out, too many requests.
RETRY_CODES = (408, 429)
# Characters of a receiver's answer kept on the row.
RESPONSE_KEPT = 1000
# Rows one repair looks at: a backlog is worked off over several runs, in bounded memory.
REPAIR_BATCH = 500
# Seconds past a delivery task's hard time limit before its claim counts as abandoned.
CLAIM_SLACK = 5
# Seconds before its next_try_at a row may be claimed: the hosts' clocks differ a little, and
# a try a few seconds early is harmless (what matters is not k tries per backoff step).
EARLY_SLACK = 5.0

IMAGE_DONE = WebhookDelivery.Event.DONE
IMAGE_FAILED = WebhookDelivery.Event.FAILED
IMAGE_DUPLICATE = WebhookDelivery.Event.DUPLICATE
SWEEP_FINISHED = WebhookDelivery.Event.SWEEP_FINISHED
# Failed images a digest names one by one; past that, it counts them only.
DIGEST_FAILURES_LISTED = 100
# The event of each final status.
EVENTS = {
    Image.Status.DONE: IMAGE_DONE,
    Image.Status.FAILED: IMAGE_FAILED,
    Image.Status.DUPLICATE: IMAGE_DUPLICATE,
}


def record(image: Image, event: str) -> None:
    """Owe one POST per WEBHOOK_URL for `event` of `image`, in the transaction that moved
    the image to its final state, after that update (see jobs/outcomes.py).

    Nothing is recorded when WEBHOOK_URL is empty. The payload is read back from the row
    as this transaction wrote it; the rows are queued only once the transaction commits.
    """
    urls = settings.WEBHOOK_URLS
    if not urls or event not in settings.WEBHOOK_EVENTS:
        return
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("webhooks.record must run in the transaction of the final state")
    row = Image.objects.select_related("duplicate_of").get(id=image.id)
    run = row.finished_at.isoformat() if row.finished_at else f"attempt {row.attempts}"
    body = json.dumps(payload(row, event), separators=(",", ":"), sort_keys=True)
    # The same run of the same transition recorded again is the same event.
    _owe(
        [
            WebhookDelivery(event=event, image_id=row.id, run=run, url=url, body=body)
            for url in urls
        ],
        image_id=row.id,
        event=event,
        run=run,
    )


def record_sweep_finished(sweep_id: int) -> None:
    """Owe one `sweep.finished` POST per URL if the image just made final was the last open
    one of its sweep; in the transaction of that final state, after it (jobs/outcomes.py).

    A sweep claims all its images before any is queued, so "none open" means finished. Of
    two images of one sweep finishing at once, each would see the other still open; the
    sweep row's lock (PostgreSQL; SQLite has one writer anyway) makes the later one wait
    for the earlier to commit, and then see it final. A sweep is told of once: a reprocess
    of its images later is told of image by image.
    """
    urls = settings.WEBHOOK_URLS
    if not urls or SWEEP_FINISHED not in settings.WEBHOOK_EVENTS:
        return
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("webhooks.record_sweep_finished must run in a transaction")
    if Sweep.objects.filter(id=sweep_id, digest_owed_at__isnull=False).exists():
        return
    sweep = Sweep.objects.select_for_update().filter(id=sweep_id).first()
    # Marked on the sweep, not judged by its delivery rows: WEBHOOK_KEEP_DAYS forgets those,
    # and a reprocess after that would tell of the sweep again.
    if sweep is None or sweep.digest_owed_at is not None:
        return
    images = Image.objects.filter(sweep_id=sweep_id)
    if images.exclude(status__in=Image.FINAL_STATUSES).exists():
        return
    Sweep.objects.filter(id=sweep_id).update(digest_owed_at=Now())
    body = json.dumps(sweep_payload(sweep, images), separators=(",", ":"), sort_keys=True)
    _owe(
        [
            WebhookDelivery(event=SWEEP_FINISHED, sweep_id=sweep_id, run="", url=url, body=body)
            for url in urls
        ],
        sweep_id=sweep_id,
        event=SWEEP_FINISHED,
    )


def _owe(deliveries: list[WebhookDelivery], **event: object) -> None:
    """Insert the rows of one event, then queue those still pending once the transaction
    commits. A row recorded before is left as it is (the unique constraints say which rows
    are the same event); `event` is the lookup that finds them all."""
    WebhookDelivery.objects.bulk_create(deliveries, ignore_conflicts=True)
    ids = list(
        WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING, **event).values_list(
            "id", flat=True
        )
    )
    transaction.on_commit(lambda: queue_deliveries(ids))


def sweep_payload(sweep: Sweep, images: QuerySet[Image]) -> dict[str, object]:
    """What a receiver is told when every image of a sweep is final: counts by status, and
    the failed ones by name with their errors (the first DIGEST_FAILURES_LISTED)."""
    counts = dict(images.values_list("status").annotate(count=Count("id")).order_by())
    failed = images.filter(status=Image.Status.FAILED).order_by("id")
    return {
        "event": SWEEP_FINISHED,
        "sweep": {
            "id": sweep.id,
            "trigger": sweep.trigger,
            "schedule": sweep.schedule_name or None,
            "folder": sweep.folder,
            "sizes": sweep.sizes,
            "started_at": sweep.started_at.isoformat(),
            "last_image_finished_at": _iso(images.aggregate(last=Max("finished_at"))["last"]),
            "images": {
                "total": sum(counts.values()),
                **{str(status): counts.get(status, 0) for status in Image.FINAL_STATUSES},
            },
            "failed": [
                {"id": image_id, "name": name, "error": error}
                for image_id, name, error in failed.values_list("id", "name", "error")[
                    :DIGEST_FAILURES_LISTED
                ]
            ],
        },
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def payload(image: Image, event: str) -> dict[str, object]:
    """What a receiver is told about an image. `archive` is relative to MEDIA_ROOT; a
    duplicate names the archive of the image it duplicates, which holds its content."""
    archive = image.archive
    if image.status == Image.Status.DUPLICATE and image.duplicate_of is not None:
        archive = image.duplicate_of.archive
    return {
        "event": event,
        "image": {
            "id": image.id,
            "name": image.name,
            "folder": image.folder,
            "status": image.status,
            "archive": archive or None,
            "sha256": image.sha256 or None,
            "sizes": image.sizes,
            "error": image.error,
            "duplicate_of": image.duplicate_of_id,
            "finished_at": image.finished_at.isoformat() if image.finished_at else None,
        },
    }


def signature(body: bytes, secret: str) -> str:
    """The X-Parroter-Signature header value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def queue_deliveries(ids: Iterable[int], countdown: float | None = None) -> None:
    """Send one delivery task per row. A message that cannot be sent is left to `repair`."""
    for delivery_id in ids:
        try:
            current_app.send_task(DELIVER_TASK, (delivery_id,), countdown=countdown)
        except (OSError, kombu.exceptions.OperationalError) as exc:
            logger.warning("webhook %s not queued (%s); the repair will send it", delivery_id, exc)


@dataclass
class Answer:
    """What came back from one POST."""

    code: int | None
    text: str = ""
    error: str = ""
    # Seconds the receiver asked to wait (its Retry-After), if it said.
    retry_after: float | None = None

    @property
    def retry(self) -> bool:
        # No answer at all (refused, reset, timed out), the receiver's own failure, or its
        # "not now".
        return self.code is None or self.code >= 500 or self.code in RETRY_CODES


def storable(text: str) -> str:
    """The receiver's words as a text column holds them: PostgreSQL's refuses NUL, and the
    row that could not be updated would be sent again and again."""
    return text.replace("\x00", "\ufffd")


def deliver(delivery_id: int) -> str:
    """Claim one pending row, POST it, record the outcome. Returns the row's new status,
    or "skipped" when another worker has it or it is no longer pending."""
    worker = this_worker()
    # Only once due: a second message for the row (a repair of a row whose message waits
    # in a busy queue, "send again" of a pending row) must not cut its backoff short. Due
    # by either clock: this host's, which a retry's countdown runs by, or the database's,
    # which "send now" stamps (repair, send again) use, so no host's clock can keep a row
    # from ever being claimed.
    slack = timedelta(seconds=EARLY_SLACK)
    due = Q(next_try_at__lte=timezone.now() + slack) | Q(next_try_at__lte=Now() + slack)
    claimed = WebhookDelivery.objects.filter(
        due, id=delivery_id, status=WebhookDelivery.Status.PENDING
    ).update(
        status=WebhookDelivery.Status.SENDING,
        claimed_by=worker,
        # The database's clock: a repair on another host compares it with its own Now().
        claimed_at=Now(),
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return "skipped"
    delivery = WebhookDelivery.objects.get(id=delivery_id)
    answer = post(delivery.url, delivery.body.encode(), delivery)
    now = timezone.now()
    fields: dict[str, object] = {
        "response_code": answer.code,
        "last_response": storable(answer.text[:RESPONSE_KEPT]),
        "last_error": storable(answer.error),
        "claimed_by": "",
        "claimed_at": None,
    }
    countdown = None
    if answer.code is not None and 200 <= answer.code < 300:
        fields.update(status=WebhookDelivery.Status.SENT, sent_at=now)
    elif answer.retry and delivery.attempts < settings.WEBHOOK_TRIES:
        wait = min(max(backoff(delivery.attempts), answer.retry_after or 0.0), MAX_BACKOFF)
        fields.update(
            status=WebhookDelivery.Status.PENDING,
            next_try_at=now + timedelta(seconds=wait),
        )
        countdown = wait if wait <= MAX_COUNTDOWN else None
    else:
        fields.update(status=WebhookDelivery.Status.FAILED)
    # Only while still ours: a repair may have taken it back if we were presumed dead.
    mine = WebhookDelivery.objects.filter(
        id=delivery_id, status=WebhookDelivery.Status.SENDING, claimed_by=worker
    ).update(**fields)
    if not mine:
        logger.warning("webhook %s was taken over while it was being sent", delivery_id)
        return "skipped"
    level = logging.INFO if fields["status"] == WebhookDelivery.Status.SENT else logging.WARNING
    logger.log(
        level,
        "webhook %s (%s) to %s: try %d, %s, now %s",
        delivery_id,
        delivery.event,
        delivery.shown_url,
        delivery.attempts,
        answer.code or answer.error,
        fields["status"],
    )
    if countdown is not None:
        queue_deliveries([delivery_id], countdown=countdown)
    return str(fields["status"])


def backoff(tries: int) -> float:
    """Seconds before the next try after `tries` failed ones: WEBHOOK_BACKOFF, doubled, at
    most MAX_BACKOFF."""
    return min(settings.WEBHOOK_BACKOFF * 2 ** min(tries - 1, 32), MAX_BACKOFF)


def send_again(ids: Iterable[int]) -> list[int]:
    """A person's "send again": failed rows (and pending ones, to send now) start a new
    series of WEBHOOK_TRIES tries at once. Returns the ids taken; they are queued once the
    change is committed. Rows sent, or being sent, are left alone."""
    waiting = (WebhookDelivery.Status.FAILED, WebhookDelivery.Status.PENDING)
    with transaction.atomic():
        rows = WebhookDelivery.objects.filter(id__in=list(ids), status__in=waiting)
        # Locked (PostgreSQL) from this read to the update: what is returned is what changed.
        taken = list(rows.select_for_update().values_list("id", flat=True))
        WebhookDelivery.objects.filter(id__in=taken).update(
            status=WebhookDelivery.Status.PENDING,
            attempts=0,
            next_try_at=Now(),
            claimed_by="",
            claimed_at=None,
        )
        transaction.on_commit(lambda: queue_deliveries(taken))
    return taken


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header's wait in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - timezone.now()).total_seconds(), 0.0)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without its body: refuse instead.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, delivery: WebhookDelivery) -> Answer:
    """POST body to url with our headers, within WEBHOOK_TIMEOUT per network operation."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Parroter-Webhook/1",
        "X-Parroter-Event": delivery.event,
        "X-Parroter-Delivery": str(delivery.id),
    }
    if settings.WEBHOOK_SECRET:
        headers["X-Parroter-Signature"] = signature(body, settings.WEBHOOK_SECRET)
    parts = urlsplit(url)
    if parts.username is not None:
        # urllib would take user:password@host for the host name (every try fails) and
        # hand it to the resolver; the credentials belong in the Authorization header.
        user, password = unquote(parts.username), unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{user}:{password}".encode()
        ).decode("ascii")
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with _opener.open(request, timeout=settings.WEBHOOK_TIMEOUT) as response:
            return Answer(response.status, _read_text(response))
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(
                exc.code,
                _read_text(exc),
                f"HTTP {exc.code} {exc.reason}",
                retry_after=_retry_after(exc.headers.get("Retry-After")),
            )
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Answer(None, error=f"no answer: {reason}")
    except http.client.HTTPException as exc:
        # Not HTTP (a wrong port), or a broken status or header line: tried again.
        return Answer(None, error=f"no valid answer: {type(exc).__name__}: {exc}")


def _read_text(response) -> str:
    try:
        return response.read(RESPONSE_KEPT).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return f"(answer unreadable: {exc})"


def repair(now: datetime | None = None) -> list[int]:
    """Queue again the rows a lost message or a dead worker left behind; returns their ids.

    Pending rows overdue by REQUEUE_AFTER lost their message (Redis restarted, or the
    process died between commit and queueing). Rows claimed for longer than any send can
    take (the task's hard time limit) are put back to pending.
    """
    # Rows sent again are due now by the database's clock (see deliver); `now` only moves
    # what counts as overdue, and the stamp with it when given (tests travel in time).
    stamp: datetime | Now = now or Now()
    now = now or timezone.now()
    Status = WebhookDelivery.Status
    # A claim is a lease as long as the delivery task's hard time limit: past it, the task
    # that holds it was killed or its host lost. No PID or host name decides (PID
    # namespaces reuse both).
    expired = Now() - timedelta(seconds=send_time_limit() + CLAIM_SLACK)
    revived = []
    for delivery in WebhookDelivery.objects.filter(
        status=Status.SENDING, claimed_at__lt=expired
    ).only("id", "claimed_by", "attempts")[:REPAIR_BATCH]:
        back = Status.PENDING if delivery.attempts < settings.WEBHOOK_TRIES else Status.FAILED
        taken_back = WebhookDelivery.objects.filter(
            id=delivery.id,
            status=Status.SENDING,
            claimed_by=delivery.claimed_by,
            claimed_at__lt=expired,
        ).update(
            status=back,
            next_try_at=stamp,
            claimed_by="",
            claimed_at=None,
            last_error=f"{delivery.claimed_by}, sending it, stopped without a result",
        )
        if taken_back and back == Status.PENDING:
            revived.append(delivery.id)
    stale = now - timedelta(seconds=settings.REQUEUE_AFTER)
    lost = list(
        WebhookDelivery.objects.filter(status=Status.PENDING, next_try_at__lt=stale)
        .order_by("next_try_at")
        .values_list("id", flat=True)[:REPAIR_BATCH]
    )
    if lost:
        # A message still on its way is harmless: only one task can claim the row.
        WebhookDelivery.objects.filter(id__in=lost, status=Status.PENDING).update(next_try_at=stamp)
    if revived or lost:
        logger.warning(
            "sending %d webhook(s) again: %d lost by a dead worker, %d due with no message "
            "(lost, or waiting longer than a message may)",
            len(revived) + len(lost),
            len(revived),
            len(lost),
        )
        queue_deliveries([*revived, *lost])
    return [*revived, *lost]


def send_time_limit() -> float:
    """The hard time limit of one delivery task: a few network timeouts and some slack."""
    return settings.WEBHOOK_TIMEOUT * 3 + 10


def this_worker() -> str:
    """host:pid, for people reading the row; nothing is decided by it."""
    return f"{socket.gethostname()}:{os.getpid()}"

"""The story in the database: sweeps of folders, and every image they found."""

from __future__ import annotations

import uuid
from datetime import datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.db.models.functions import Now
from django.db.models.sql.where import AND
from django.utils import timezone

from .redis_server import redact

if TYPE_CHECKING:
    from .storage import FileIdentity


class DrillDownQuerySet(models.QuerySet):
    """A queryset whose datetimes() walks the field's index, for the admin's date drill-down.

    The admin lists the years, months or days that hold rows with QuerySet.datetimes(),
    which truncates the field of every row in the database, on SQLite by a Python function
    called per row: 2.2 s for the Images list with 200,000 images. Here each period found
    costs one lookup in the field's index (the first row at or after the period's start),
    so the work follows the periods shown, not the rows: a month of days is at most 32
    lookups. The lists are the same, in the same time zone.
    """

    def datetimes(
        self,
        field_name: str,
        kind: Literal["year", "month", "week", "day", "hour", "minute", "second"],
        order: Literal["ASC", "DESC"] = "ASC",
        tzinfo: tzinfo | None = None,
    ) -> Any:
        if kind not in ("year", "month", "day") or order not in ("ASC", "DESC"):
            return super().datetimes(field_name, kind, order, tzinfo)
        zone = tzinfo or timezone.get_current_timezone()
        rows = (
            self.filter(**{f"{field_name}__isnull": False})
            .order_by(field_name)
            .values_list(field_name, flat=True)
        )
        periods: list[datetime] = []
        first = rows.first()
        while first is not None:
            period = _period_start(first.astimezone(zone), kind)
            following = _next_period(period, kind)
            if not (_clean_start(period) and (following is None or _clean_start(following))):
                # Dates that do not follow the instants there (St John's turned its clocks
                # back from 00:01 to 23:01 until 2011): a walk would skip or repeat them.
                return super().datetimes(field_name, kind, order, tzinfo)
            periods.append(period)
            if following is None:
                break
            after = rows.filter(**{f"{field_name}__gte": following})
            # SQLite starts its index search at the first lower bound it is given on the
            # column: the list's own (the year shown, say) would make each lookup walk the
            # rows of the periods found before. The one added here goes first (PostgreSQL
            # takes the tighter one either way).
            where = after.query.where
            if where.connector == AND and not where.negated:
                where.children.insert(0, where.children.pop())
            first = after.first()
        return periods if order == "ASC" else periods[::-1]


def _period_start(moment: datetime, kind: str) -> datetime:
    """The start of the year, month or day holding `moment`, in its time zone."""
    day = moment.date()
    if kind == "year":
        day = day.replace(month=1, day=1)
    elif kind == "month":
        day = day.replace(day=1)
    return datetime.combine(day, time(), tzinfo=moment.tzinfo)


def _next_period(start: datetime, kind: str) -> datetime | None:
    """The start of the period after `start`'s; None after the last there is (9999)."""
    try:
        if kind == "year":
            return start.replace(year=start.year + 1)
        if kind == "month":
            return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        return datetime.combine(start.date() + timedelta(days=1), time(), tzinfo=start.tzinfo)
    except (ValueError, OverflowError):
        return None


def _clean_start(start: datetime) -> bool:
    """Whether every instant before `start` is of an earlier period and every one from it
    on of its own or a later one: not so where the clocks went back across it (it is shown
    twice), nor where they skipped from before it to past it."""
    before, after = start.utcoffset(), start.replace(fold=1).utcoffset()
    if before == after:
        return True
    if after < before:  # type: ignore[operator]
        return False
    # Skipped: clean if the skip starts at it (Santiago's clocks go from 24:00 to 01:00).
    earlier = start - timedelta(microseconds=1)
    return earlier.utcoffset() == earlier.replace(fold=1).utcoffset()


class Sweep(models.Model):
    """One pass over a folder: what it saw, what it claimed, what it skipped."""

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "schedule"
        MANUAL = "manual", "manual"
        UPLOAD = "upload", "upload"

    class Status(models.TextChoices):
        RUNNING = "running", "running"
        DONE = "done", "done"
        SKIPPED = "skipped", "skipped (another sweep of this folder was running)"
        HELD = "held", "held back (too little free disk space)"
        FAILED = "failed", "failed"

    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    schedule_name = models.CharField(
        max_length=200, blank=True, help_text="Periodic task that sent this sweep, if any."
    )
    folder = models.CharField(max_length=1024)
    sizes = models.JSONField(default=list)
    options = models.JSONField(
        default=dict, blank=True, help_text="Output options, e.g. quality; {} means the defaults."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    task_id = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    seen = models.PositiveIntegerField(default=0, help_text="Candidate files found.")
    claimed = models.PositiveIntegerField(default=0, help_text="New files taken for processing.")
    unstable = models.PositiveIntegerField(
        default=0, help_text="Files skipped because they were still changing."
    )
    ignored = models.PositiveIntegerField(
        default=0, help_text="Junk, hidden and partial files left alone."
    )
    requeued = models.PositiveIntegerField(
        default=0, help_text="Images whose work was lost (dead worker, lost message) and redone."
    )
    error = models.TextField(blank=True)
    digest_owed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When its sweep.finished webhook was owed: a sweep is told of once, even "
        "after WEBHOOK_KEEP_DAYS forgot the delivery.",
    )
    requested_by = models.ForeignKey(
        "auth.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Who uploaded the files of an upload sweep.",
    )

    objects = DrillDownQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [
            models.Index(fields=["folder", "-started_at"]),
            # Each schedule's last sweep (the periodic tasks' list): without it, the last of
            # a schedule that has none walks every sweep by date.
            models.Index(fields=["schedule_name", "-started_at", "-id"]),
        ]
        permissions = [("sweep_now", "Can sweep a folder now")]

    def __str__(self) -> str:
        return f"sweep #{self.pk} of {self.folder}"

    @property
    def duration(self) -> timedelta | None:
        return self.finished_at - self.started_at if self.finished_at else None

    def finish(self, status: str, error: str = "") -> None:
        """Record the end of this sweep with its counts."""
        self.status = status
        self.error = error
        self.finished_at = timezone.now()
        self.save()


def lease_end() -> models.Expression:
    """LEASE_SECONDS from now by the database's clock, the one clock every host shares."""
    return Now() + timedelta(seconds=settings.LEASE_SECONDS)


# A run that stopped renewing its lease: its worker died, its host was lost, or it froze.
# Judged by the database's clock, never by a host name or a PID (containers share both).
LEASE_EXPIRED = Q(status="processing") & (Q(lease_until__lt=Now()) | Q(lease_until=None))
# Images one statement of requeue_lost marks: a lost backlog of thousands (a broker restarted
# without persistence) in a few statements, not one each.
REQUEUE_BATCH = 500


class ImageQuerySet(DrillDownQuerySet):
    """The transitions that begin from an id: starting a run, and keeping it alive."""

    def start(self, image_id: int, task_id: str = "", worker: str = "") -> uuid.UUID | None:
        """pending -> processing for one run. Returns the run's token, or None if not pending.

        Every later transition of this run is conditional on the token, so a run that lost
        the image (its lease ran out and a sweep retried it) changes nothing.
        """
        token = uuid.uuid4()
        started = self.filter(id=image_id, status=Image.Status.PENDING).update(
            status=Image.Status.PROCESSING,
            token=token,
            lease_until=lease_end(),
            attempts=F("attempts") + 1,
            worker=worker,
            task_id=task_id,
            started_at=Now(),
            error="",
        )
        return token if started else None

    def renew(self, image_id: int, token: uuid.UUID) -> bool:
        """Extend a run's lease; False once the run no longer owns its image."""
        return bool(
            self.filter(id=image_id, status=Image.Status.PROCESSING, token=token).update(
                lease_until=lease_end()
            )
        )

    def lease_expired(self) -> ImageQuerySet:
        """Images in processing whose run stopped renewing its lease."""
        return self.filter(LEASE_EXPIRED)

    def requeue_lost(self, image_ids: list[int], queued_before: datetime) -> list[int]:
        """Mark pending images still queued before `queued_before` as queued again now
        (their message was lost); returns those this call marked. Sweeps of several folders
        and jobs.recover may pick the same images at once (the oldest pending anywhere):
        each image goes to one of them, so one message is sent for it, not one each."""
        now = timezone.now()
        pending = self.filter(status=Image.Status.PENDING, queued_at__lt=queued_before)
        marked: list[int] = []
        for start in range(0, len(image_ids), REQUEUE_BATCH):
            batch = image_ids[start : start + REQUEUE_BATCH]
            # Read and marked in one transaction, the rows locked (PostgreSQL; SQLite takes
            # its one write lock at the start): another caller then sees them queued anew.
            with transaction.atomic():
                mine = set(
                    pending.filter(id__in=batch)
                    .select_for_update(skip_locked=True)
                    .values_list("id", flat=True)
                )
                self.filter(id__in=mine).update(queued_at=now)
            marked += [image_id for image_id in batch if image_id in mine]  # in the order asked
        return marked


class Image(models.Model):
    """One file taken from a folder (or uploaded), from claim to archive or failure.

    Its state changes are conditional updates, one method per transition, all here:
    `Image.objects.start` and `renew` (by id), then `mark_done`, `mark_failed`,
    `mark_duplicate` and `release_changed` by the run holding the token, `retry` by a sweep
    once the run's lease ran out, and `reclaim` to process a finished image again. Each
    returns whether it happened; a run that lost its image changes nothing.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        PROCESSING = "processing", "processing"
        DONE = "done", "done"
        FAILED = "failed", "failed"
        DUPLICATE = "duplicate", "duplicate"

    class Source(models.TextChoices):
        FOLDER = "folder", "watched folder"
        UPLOAD = "upload", "upload"

    FINAL_STATUSES = (Status.DONE, Status.FAILED, Status.DUPLICATE)

    sweep = models.ForeignKey(
        Sweep, null=True, blank=True, on_delete=models.SET_NULL, related_name="images"
    )
    # A copy of its sweep's, taken at the claim: counting images by schedule (/metrics, on
    # every scrape) then reads one index, not every image joined to its sweep.
    schedule_name = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="The periodic task whose sweep claimed it; empty for uploads and sweeps "
        "asked for by hand.",
    )
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.FOLDER)
    uploaded_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    folder = models.CharField(max_length=1024, help_text="Folder the file was found in.")
    name = models.CharField(max_length=1024, help_text="Path relative to the folder.")
    source_path = models.CharField(
        max_length=2048, help_text="Absolute path where the file was found."
    )
    original_path = models.CharField(
        max_length=2048, blank=True, help_text="Where the original is kept now."
    )
    # True while the original still sits where it was found: that path is claimed by this
    # row, and no other row may claim it until the original has been moved on.
    in_folder = models.BooleanField(default=True)
    file_size = models.BigIntegerField()
    mtime_ns = models.BigIntegerField()
    # With size and mtime, which file was claimed: what is found at source_path is read or
    # moved only if it is this one. Empty on records made before they were kept.
    device = models.BigIntegerField(null=True, blank=True)
    inode = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    format = models.CharField(max_length=16, blank=True)
    sizes = models.JSONField(default=list)
    sizes_key = models.CharField(max_length=400, help_text="Sizes, normalised, for duplicates.")
    options = models.JSONField(
        default=dict, blank=True, help_text="Output options, e.g. quality; {} means the defaults."
    )
    thumbnails = models.JSONField(default=dict, blank=True, help_text="Size label -> [w, h].")
    notes = models.TextField(
        blank=True, help_text="Where the output differs from its options (a format fallback)."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    archive = models.CharField(max_length=1024, blank=True, help_text="Relative to MEDIA_ROOT.")
    archive_size = models.BigIntegerField(null=True, blank=True)
    duplicate_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="duplicates"
    )
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    worker = models.CharField(
        max_length=255, blank=True, help_text="host:pid of the last try (for people to read)."
    )
    token = models.UUIDField(
        null=True, blank=True, editable=False, help_text="Identifies the current or last run."
    )
    lease_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="The run renews this while alive; once it passes, a sweep retries the image.",
    )
    queued_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = ImageQuerySet.as_manager()

    class Meta:
        ordering = ["-queued_at", "-id"]
        permissions = [("reprocess_image", "Can reprocess images")]
        constraints = [
            # One owner per file waiting in a folder: the claim of overlapping sweeps.
            models.UniqueConstraint(
                fields=["source_path"],
                condition=Q(in_folder=True),
                name="one_claim_per_waiting_file",
            ),
            # One archive per content and sizes: a second "done" is a duplicate. An image
            # whose zip retention deleted no longer counts: the same content gets a new zip.
            models.UniqueConstraint(
                fields=["sha256", "sizes_key"],
                condition=Q(status="done") & ~Q(archive=""),
                name="one_archive_per_content_and_sizes",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "queued_at"]),
            models.Index(fields=["in_folder", "source_path"]),
            models.Index(fields=["status", "lease_until"]),
            # The admin's format filter lists the formats seen, once per filter on every
            # page of the images' list: without it, each is a pass over the whole history.
            models.Index(fields=["format"]),
            # /metrics counts images and sums archive bytes by status and schedule from this
            # index alone (archive_size is null whenever there is no archive).
            models.Index(fields=["status", "schedule_name", "archive_size"]),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL_STATUSES

    @staticmethod
    def sizes_key_for(labels: list[str], options: dict[str, object] | None = None) -> str:
        """Sizes and output options, normalised: the same content and key is a duplicate."""
        extra = "".join(f";{name}={value}" for name, value in sorted((options or {}).items()))
        return ",".join(labels) + extra

    def _this_run(self) -> models.QuerySet[Image]:
        """This image, while the run that holds `token` still owns it."""
        return Image.objects.filter(id=self.id, status=self.Status.PROCESSING, token=self.token)

    def is_current_run(self) -> bool:
        """True while this run still owns the image (no sweep took it over)."""
        return self._this_run().exists()

    def mark_done(
        self,
        *,
        archive: str,
        archive_size: int,
        width: int,
        height: int,
        format: str,
        thumbnails: dict[str, list[int]],
        notes: str = "",
    ) -> bool:
        """processing -> done with its archive. False if this run no longer owns the image.

        Every final state records the sha256 this run computed (self.sha256) with it.
        Raises IntegrityError when the same content with the same sizes is done already.
        """
        result = {
            "archive": archive,
            "archive_size": archive_size,
            "width": width,
            "height": height,
            "format": format,
            "thumbnails": thumbnails,
            "notes": notes,
        }
        # A savepoint, so that the IntegrityError of a duplicate leaves the connection usable.
        with transaction.atomic():
            done = self._this_run().update(
                status=self.Status.DONE,
                finished_at=Now(),
                lease_until=None,
                sha256=self.sha256,
                **result,
            )
            if done:
                _finished(self)
        if done:
            self.status = self.Status.DONE
            for name, value in result.items():
                setattr(self, name, value)
        return bool(done)

    def mark_failed(self, reason: str) -> bool:
        """processing -> failed with reason. False if this run no longer owns the image."""
        return self._finish_failed(reason)

    def release_changed(self, reason: str) -> bool:
        """processing -> failed, and the path is free for a new claim of the changed file."""
        return self._finish_failed(reason, in_folder=False)

    def _finish_failed(self, reason: str, **extra: object) -> bool:
        with transaction.atomic():
            failed = self._this_run().update(
                status=self.Status.FAILED,
                error=reason,
                finished_at=Now(),
                lease_until=None,
                sha256=self.sha256,
                **extra,
            )
            if failed:
                _finished(self)
        if failed:
            self.status = self.Status.FAILED
            self.error = reason
            for name, value in extra.items():
                setattr(self, name, value)
        return bool(failed)

    def mark_duplicate(self, first: Image) -> bool:
        """processing -> duplicate of first, while first is still done with its zip (a
        reprocess may have just taken it back to pending, retention deleted its zip). False
        if not recorded."""
        first_still_done = Image.objects.filter(id=first.id, status=self.Status.DONE).exclude(
            archive=""
        )
        with transaction.atomic():
            # Locks the first's row (PostgreSQL): retention, deleting old archives, holds the
            # same lock, so a duplicate never takes a zip that is being deleted.
            list(first_still_done.select_for_update().values_list("id", flat=True))
            recorded = (
                self._this_run()
                .filter(Exists(first_still_done))
                .update(
                    status=self.Status.DUPLICATE,
                    duplicate_of=first,
                    error="",
                    archive="",
                    archive_size=None,
                    thumbnails={},
                    finished_at=Now(),
                    lease_until=None,
                    sha256=self.sha256,
                )
            )
            if recorded:
                _finished(self)
        if recorded:
            self.status = self.Status.DUPLICATE
            self.duplicate_of = first
            self.archive, self.archive_size, self.thumbnails = "", None, {}
        return bool(recorded)

    def retry(self, max_attempts: int) -> str | None:
        """Take over a run whose lease ran out: pending again, or failed after max_attempts.

        Returns the new status, or None when the run renewed its lease meanwhile or another
        sweep got here first. Conditional on the dead run's token and on the lease being
        expired at the moment of the update, so a live run is never taken over.
        """
        dead = Image.objects.lease_expired().filter(id=self.id, token=self.token)
        if self.attempts >= max_attempts:
            reason = (
                f"processing stopped without a result {self.attempts} times (its worker was "
                "killed or crashed, its host was lost, or the time limit passed); giving up "
                "on this file"
            )
            with transaction.atomic():
                if not dead.update(
                    status=self.Status.FAILED, error=reason, finished_at=Now(), lease_until=None
                ):
                    return None
                _finished(self)
            self.status, self.error = self.Status.FAILED, reason
            return self.status
        if not dead.update(status=self.Status.PENDING, queued_at=timezone.now(), lease_until=None):
            return None
        # queued_at stays the dead run's here: its partial zips are found by it.
        self.status = self.Status.PENDING
        return self.status

    def reclaim(
        self, sizes: list[str], kept: FileIdentity, options: dict[str, object] | None = None
    ) -> bool:
        """final -> pending, to be processed again from its kept original with sizes.

        `kept` is the identity of the kept original as read just now.

        Only if nobody changed it since it was read, and no duplicate gets its zip from it.
        The old archive stays recorded until the new run records its own. Its output options
        stay, unless new `options` (resolved) are given.
        """
        if options is not None:
            self.options = options
        fresh = {
            "status": self.Status.PENDING,
            "file_size": kept.size,
            "mtime_ns": kept.mtime_ns,
            "device": kept.device,
            "inode": kept.inode,
            "sizes": sizes,
            "sizes_key": self.sizes_key_for(sizes, self.options),
            "options": self.options,
            "notes": "",
            "error": "",
            "duplicate_of": None,
            "attempts": 0,
            "worker": "",
            "task_id": "",
            "token": None,
            "lease_until": None,
            "started_at": None,
            "finished_at": None,
            # Waiting starts now: jobs.recover requeues what waited REQUEUE_AFTER.
            "queued_at": timezone.now(),
        }
        with transaction.atomic():
            # Locked first (PostgreSQL), as mark_duplicate locks it: a duplicate recorded
            # meanwhile is committed before the update below reads, so it is seen. An update
            # that waited for that lock would judge the duplicates by what it saw before.
            list(Image.objects.filter(id=self.id).select_for_update().values_list("id"))
            claimed = (
                Image.objects.filter(
                    id=self.id,
                    status=self.status,
                    in_folder=False,
                    original_path=self.original_path,
                )
                # A duplicate of it may have been recorded since it was read.
                .exclude(
                    Exists(
                        Image.objects.filter(
                            duplicate_of=OuterRef("pk"), status=self.Status.DUPLICATE
                        )
                    )
                )
                .update(source_path=F("original_path"), **fresh)
            )
        if claimed:
            self.source_path = self.original_path
            for name, value in fresh.items():
                setattr(self, name, value)
        return bool(claimed)


class SweepLock(models.Model):
    """At most one sweep runs per folder. The lock is a lease, renewed while its sweep runs
    (jobs/leases.py): one left by a dead sweep runs out LEASE_SECONDS later."""

    folder = models.CharField(max_length=1024, unique=True)
    # The run holding it: a token, not a sweep record, since an idle sweep leaves none.
    owner = models.UUIDField(default=uuid.uuid4)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"lock on {self.folder}"

    @classmethod
    def acquire(cls, folder: str) -> uuid.UUID | None:
        """Hold `folder` for one sweep: the token to renew and release it with, or None if
        a live sweep holds it."""
        owner = uuid.uuid4()
        try:
            with transaction.atomic():
                cls.objects.create(folder=folder, owner=owner, expires_at=lease_end())
            return owner
        except IntegrityError:
            # Held: take it over only if its sweep stopped renewing it.
            taken = cls.objects.filter(folder=folder, expires_at__lt=Now()).update(
                owner=owner, expires_at=lease_end()
            )
            return owner if taken == 1 else None

    @classmethod
    def renew(cls, folder: str, owner: uuid.UUID) -> bool:
        """Extend the lease; False once another sweep took the lock over."""
        return bool(cls.objects.filter(folder=folder, owner=owner).update(expires_at=lease_end()))

    @classmethod
    def release(cls, folder: str, owner: uuid.UUID) -> None:
        cls.objects.filter(folder=folder, owner=owner).delete()


class ProcessingTime(models.Model):
    """How many images reached each final state, by how long their run took: the histogram
    of /metrics, counted as each image finishes, in the same transaction.

    Counted rather than computed from the images: a Prometheus histogram only ever grows,
    and deleting old images must not make it shrink; a scrape reads a few dozen rows.
    """

    # Upper bounds (seconds) of the buckets: small images take tens of milliseconds,
    # large photos a few seconds, the time limit a few minutes.
    BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    OVER = "+Inf"

    status = models.CharField(max_length=16)
    le = models.CharField(max_length=16, help_text="Upper bound of the bucket, in seconds.")
    count = models.PositiveBigIntegerField(default=0)
    seconds = models.FloatField(default=0.0, help_text="Sum of the times counted here.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["status", "le"], name="one_count_per_bucket")
        ]

    def __str__(self) -> str:
        return f"{self.status} <= {self.le} s: {self.count}"

    @classmethod
    def label(cls, bound: float) -> str:
        return repr(float(bound))

    @classmethod
    def add(cls, status: str, seconds: float) -> None:
        """Count one image that ended in `status` after `seconds`."""
        le = next((cls.label(b) for b in cls.BOUNDS if seconds <= b), cls.OVER)
        rows = cls.objects.filter(status=status, le=le)
        more = {"count": F("count") + 1, "seconds": F("seconds") + seconds}
        if not rows.update(**more):
            ProcessingTime.objects.bulk_create(
                [ProcessingTime(status=status, le=le)], ignore_conflicts=True
            )
            rows.update(**more)


class Heartbeat(models.Model):
    """The last sign of life of beat or a worker, or what a watch folder was last seen on.

    Written by the processes themselves every few seconds, so that /healthz can tell a
    live system from a stopped one by reading the database alone.
    """

    class Kind(models.TextChoices):
        BEAT = "beat", "beat"
        WORKER = "worker", "worker"
        FOLDER = "folder", "watch folder"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(
        max_length=1024, unique=True, help_text="Worker node name, beat@host, or folder path."
    )
    seen_at = models.DateTimeField(default=timezone.now)
    detail = models.JSONField(
        default=dict, blank=True, help_text="For a folder: the mount point it was seen on."
    )

    class Meta:
        indexes = [models.Index(fields=["kind", "-seen_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"

    @classmethod
    def record(cls, kind: str, name: str, **detail: object) -> None:
        """Mark `name` alive now (one row per name, created on first sight)."""
        now = timezone.now()
        fields: dict[str, object] = {"kind": kind, "seen_at": now}
        if detail:
            fields["detail"] = detail
        if not cls.objects.filter(name=name).update(**fields):
            Heartbeat.objects.bulk_create([Heartbeat(name=name, **fields)], ignore_conflicts=True)


class WebhookDelivery(models.Model):
    """One webhook POST owed to one URL for one event: the outbox.

    Written in the same transaction as the image's final state, so an event that happened
    is never left unsent, and never recorded twice for the same run of the same image. A
    sweep's digest (`sweep.finished`) is written with the final state of its last image.
    """

    class Event(models.TextChoices):
        DONE = "image.done", "image.done"
        FAILED = "image.failed", "image.failed"
        DUPLICATE = "image.duplicate", "image.duplicate"
        SWEEP_FINISHED = "sweep.finished", "sweep.finished"

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        SENDING = "sending", "sending"
        SENT = "sent", "sent"
        FAILED = "failed", "failed"

    event = models.CharField(max_length=32, choices=Event.choices)
    image = models.ForeignKey(
        Image, null=True, blank=True, on_delete=models.SET_NULL, related_name="webhooks"
    )
    sweep = models.ForeignKey(
        Sweep,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="webhooks",
        help_text="The sweep a sweep.finished digest tells of.",
    )
    run = models.CharField(
        max_length=64, help_text="When the image finished: tells reprocessed runs apart."
    )
    url = models.CharField(max_length=2048)
    body = models.TextField(help_text="The JSON sent, byte for byte what is signed.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_try_at = models.DateTimeField(default=timezone.now)
    claimed_by = models.CharField(max_length=255, blank=True, help_text="host:pid sending it.")
    claimed_at = models.DateTimeField(null=True, blank=True)
    response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_response = models.TextField(blank=True, help_text="Start of the last answer's body.")
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    objects = DrillDownQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["image", "event", "run", "url"], name="one_delivery_per_event_and_url"
            ),
            models.UniqueConstraint(
                fields=["sweep", "event", "url"], name="one_digest_per_sweep_and_url"
            ),
        ]
        indexes = [models.Index(fields=["status", "next_try_at"])]

    def __str__(self) -> str:
        if self.event == self.Event.SWEEP_FINISHED:
            return f"{self.event} of sweep #{self.sweep_id} to {self.shown_url}"
        return f"{self.event} #{self.image_id} to {self.shown_url}"

    @property
    def shown_url(self) -> str:
        """The URL with its password masked: the outbox and the log are read by people the
        receiver's credentials are not meant for."""
        return redact(self.url)


class ScheduleActivity(models.Model):
    """What the sweeps of one schedule did, counted rather than recorded one by one.

    A schedule sweeps every few seconds and nearly always finds nothing. Such a sweep leaves
    no Sweep row and no task result: it adds one to `idle_sweeps` here. The sweeps that did
    something (or failed, or were held back) are Sweep rows, as before.
    """

    schedule_name = models.CharField(max_length=200, unique=True)
    swept_at = models.DateTimeField(
        null=True, blank=True, help_text="When a worker last ran a sweep of it, idle or not."
    )
    idle_sweeps = models.PositiveBigIntegerField(
        default=0, help_text="Sweeps that found nothing to do (not recorded one by one)."
    )
    last_idle_at = models.DateTimeField(null=True, blank=True)
    last_found = models.ForeignKey(
        Sweep,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The last sweep of it that found something.",
    )

    class Meta:
        verbose_name_plural = "schedule activity"

    def __str__(self) -> str:
        return f"activity of {self.schedule_name}"

    @classmethod
    def forget(cls, sender: type, instance: Any, **kwargs: Any) -> None:
        """A periodic task was deleted: its activity goes with it (a post_delete receiver)."""
        cls.objects.filter(schedule_name=instance.name).delete()

    @classmethod
    def note_idle(cls, schedule_name: str, ran: bool = True) -> None:
        """One more sweep of the schedule found nothing: counted in one statement. One
        skipped because another sweep held the folder (`ran` False) did not look at it, so
        it does not move `last_idle_at` (/metrics' last good sweep)."""
        now = timezone.now()
        seen: dict[str, object] = {"last_idle_at": now} if ran else {}
        cls._note(
            schedule_name,
            {"idle_sweeps": F("idle_sweeps") + 1, "swept_at": now, **seen},
            {"idle_sweeps": 1, "swept_at": now, **seen},
        )

    @classmethod
    def note_recorded(cls, sweep: Sweep) -> None:
        """A sweep of the schedule left a record; it found something unless it failed."""
        changes: dict[str, object] = {"swept_at": timezone.now()}
        if sweep.status == Sweep.Status.DONE:
            changes["last_found"] = sweep
        cls._note(sweep.schedule_name, changes, changes)

    @classmethod
    def _note(cls, name: str, update: dict[str, object], create: dict[str, object]) -> None:
        if cls.objects.filter(schedule_name=name).update(**update):
            return
        try:
            with transaction.atomic():
                cls.objects.create(schedule_name=name, **create)
        except IntegrityError:
            # Another worker made the row first: count on it.
            cls.objects.filter(schedule_name=name).update(**update)


def _finished(image: Image) -> None:
    """What a final state owes (metrics, webhooks), in the transaction that set it."""
    # Imported here: outcomes and webhooks are built on these models.
    from .outcomes import image_finished

    image_finished(image)

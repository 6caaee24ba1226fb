"""The story in the database: sweeps of folders, and every image they found."""

from __future__ import annotations

from datetime import timedelta

from django.db import models
from django.db.models import F, Q
from django.utils import timezone


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
        FAILED = "failed", "failed"

    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    schedule_name = models.CharField(
        max_length=200,
        blank=True,
        db_index=True,
        help_text="Periodic task that sent this sweep, if any.",
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
    requested_by = models.ForeignKey(
        "auth.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Who uploaded the files of an upload sweep.",
    )

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["folder", "-started_at"])]
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


class Image(models.Model):
    """One file taken from a folder (or uploaded), from claim to archive or failure."""

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
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    archive = models.CharField(max_length=1024, blank=True, help_text="Relative to MEDIA_ROOT.")
    archive_size = models.BigIntegerField(null=True, blank=True)
    duplicate_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="duplicates"
    )
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True, help_text="host:pid of the last try.")
    queued_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True, db_index=True)

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
            # One archive per content and sizes: a second "done" is a duplicate.
            models.UniqueConstraint(
                fields=["sha256", "sizes_key"],
                condition=Q(status="done"),
                name="one_archive_per_content_and_sizes",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "queued_at"]),
            models.Index(fields=["in_folder", "source_path"]),
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

    @classmethod
    def start(cls, image_id: int, worker: str, task_id: str) -> bool:
        """Claim a pending image for one run; True means this caller owns it now."""
        return bool(
            cls.objects.filter(id=image_id, status=cls.Status.PENDING).update(
                status=cls.Status.PROCESSING,
                attempts=F("attempts") + 1,
                worker=worker,
                task_id=task_id,
                started_at=timezone.now(),
                error="",
            )
        )


class SweepLock(models.Model):
    """At most one sweep runs per folder; a lock left by a dead sweep expires."""

    folder = models.CharField(max_length=1024, unique=True)
    sweep = models.ForeignKey(Sweep, on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"lock on {self.folder}"


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
            cls.objects.bulk_create([cls(status=status, le=le)], ignore_conflicts=True)
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
            cls.objects.bulk_create([cls(name=name, **fields)], ignore_conflicts=True)


class WebhookDelivery(models.Model):
    """One webhook POST owed to one URL for one event: the outbox.

    Written in the same transaction as the image's final state, so an event that happened
    is never left unsent, and never recorded twice for the same run of the same image.
    """

    class Event(models.TextChoices):
        DONE = "image.done", "image.done"
        FAILED = "image.failed", "image.failed"
        DUPLICATE = "image.duplicate", "image.duplicate"

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        SENDING = "sending", "sending"
        SENT = "sent", "sent"
        FAILED = "failed", "failed"

    event = models.CharField(max_length=32, choices=Event.choices)
    image = models.ForeignKey(
        Image, null=True, blank=True, on_delete=models.SET_NULL, related_name="webhooks"
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

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["image", "event", "run", "url"], name="one_delivery_per_event_and_url"
            ),
        ]
        indexes = [models.Index(fields=["status", "next_try_at"])]

    def __str__(self) -> str:
        return f"{self.event} #{self.image_id} to {self.url}"

"""`manage.py sweep`: sweep a folder now and watch its images finish."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from kombu.exceptions import OperationalError

from jobs import runner, sweeper
from jobs.models import Image, Sweep
from jobs.tasks import queue_images, requeue_policy

BAR_WIDTH = 30


class Command(BaseCommand):
    help = "Sweep a folder now (default: the watch folder) and wait for its images."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--folder", help="Absolute folder to sweep (default WATCH_FOLDER).")
        parser.add_argument("--sizes", nargs="+", help="Sizes like 128x128 (default: settings).")
        parser.add_argument("--quality", type=int, help="JPEG/WebP/AVIF quality, 1 to 95.")
        for name, (choices, _default) in sweeper.PRESET_CHOICES.items():
            parser.add_argument(
                f"--{name}", choices=choices, help="Output preset (default: settings)."
            )
        parser.add_argument(
            "--gps", action="store_true", help="With --metadata keep: keep the GPS block too."
        )
        parser.add_argument(
            "--inline",
            action="store_true",
            help="Process the images in this process instead of sending them to the workers.",
        )
        parser.add_argument("--no-wait", action="store_true", help="Queue and return.")
        parser.add_argument("--timeout", type=float, default=0, help="Give up waiting after N s.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            preset = {
                name: options[name]
                for name in ("quality", *sweeper.PRESET_CHOICES, "gps")
                if options.get(name) not in (None, False)
            }
            outcome = sweeper.sweep_folder(
                options["folder"], options["sizes"], options=preset, requeue=requeue_policy()
            )
        except sweeper.SweepArgumentsError as exc:
            raise CommandError(str(exc)) from None
        record, image_ids = outcome.sweep, outcome.to_queue
        if record.status == Sweep.Status.SKIPPED:
            raise CommandError(f"another sweep of {record.folder} is running; try again shortly")
        if record.status == Sweep.Status.HELD:
            raise CommandError(record.error)
        self.stdout.write(
            f"sweep #{record.id} of {record.folder}: {record.claimed} new, {record.requeued} "
            f"retried, {record.unstable} still changing, {record.ignored} ignored; "
            f"sizes {', '.join(record.sizes)}"
        )
        if not image_ids:
            return
        if options["inline"]:
            for image_id in image_ids:
                runner.process_image(image_id)
                self.show_progress(image_ids)
        else:
            try:
                queue_images(image_ids, uploaded=outcome.uploads)
            except OperationalError as exc:
                raise CommandError(
                    f"the broker does not answer ({exc}); the {len(image_ids)} image(s) stay "
                    "claimed and the next sweep queues them once it is up, or run again "
                    "with --inline to process them here"
                ) from None
            if options["no_wait"]:
                return
            self.wait(image_ids, options["timeout"])
        self.stdout.write("")
        self.report(image_ids)

    def wait(self, image_ids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout if timeout else None
        while not self.show_progress(image_ids):
            if deadline and time.monotonic() > deadline:
                self.stdout.write("")
                raise CommandError(f"timed out after {timeout:g} s; the images stay queued")
            time.sleep(0.5)

    def show_progress(self, image_ids: list[int]) -> bool:
        """Draw the bar; True once every image is final."""
        statuses = list(Image.objects.filter(id__in=image_ids).values_list("status", flat=True))
        finished = sum(status in Image.FINAL_STATUSES for status in statuses)
        failed = statuses.count(Image.Status.FAILED)
        filled = BAR_WIDTH * finished // len(image_ids)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stdout.write(
            f"\r[{bar}] {finished}/{len(image_ids)} finished, {failed} failed", ending=""
        )
        self.stdout.flush()
        return finished == len(image_ids)

    def report(self, image_ids: list[int]) -> None:
        for image in Image.objects.filter(id__in=image_ids, status=Image.Status.FAILED):
            self.stdout.write(f"failed: {image.name}: {image.error}")

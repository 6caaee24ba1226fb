"""`manage.py retention`: delete kept originals and archives past their retention now."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from jobs.retention import apply_retention


def days(value: int) -> str:
    return f"{value} days" if value else "forever"


class Command(BaseCommand):
    help = (
        "Delete kept originals older than KEEP_ORIGINALS_DAYS and archives older than "
        "KEEP_ARCHIVES_DAYS (the images' records stay), idle sweep records older than "
        "IDLE_SWEEP_DAYS, and sent or failed webhook deliveries older than WEBHOOK_KEEP_DAYS. "
        "The hourly jobs.apply_retention task does the same."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would go; delete nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = options["dry_run"]
        self.stdout.write(
            f"originals kept {days(settings.KEEP_ORIGINALS_DAYS)}, archives kept "
            f"{days(settings.KEEP_ARCHIVES_DAYS)}, idle sweep records kept "
            f"{days(settings.IDLE_SWEEP_DAYS)}, webhook deliveries kept "
            f"{days(settings.WEBHOOK_KEEP_DAYS)}"
        )
        report = apply_retention(dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(
            f"{verb} {report.originals} original(s), {report.archives} archive(s), "
            f"{report.idle_sweeps} idle sweep record(s) and {report.webhook_deliveries} "
            f"webhook delivery(ies); {report.kept_for_duplicates} old "
            "archive(s) kept for duplicates still within retention"
        )
        if report.not_deleted:
            self.stderr.write(
                f"{report.not_deleted} file(s) could not be deleted (see the warnings above); "
                "their records still point to them"
            )

"""python manage.py purgeresults: delete expired results in batches."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from djqueue.results import get_result_backend


class Command(BaseCommand):
    help = (
        "Delete results older than their TTL (DJQUEUE['RESULT_TTL']) in small batches. "
        "The Redis results backend expires keys by itself; this is for the database backend."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch (default 1000)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        deleted = get_result_backend().purge_expired(batch_size=options["batch_size"])
        self.stdout.write(f"Deleted {deleted} expired results.")

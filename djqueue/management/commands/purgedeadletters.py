"""python manage.py purgedeadletters --older-than 30d: delete old dead letters in batches."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from djqueue.deadletters import parse_duration, purge_dead_letters
from djqueue.models import DeadLetter


class Command(BaseCommand):
    help = (
        "Delete dead letters that failed more than a given time ago, in small batches "
        "(each its own short transaction), so the table is never locked for long."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 90m (d, h, m, s, ms, w)"
        )
        parser.add_argument(
            "--status",
            action="append",
            choices=DeadLetter.Status.values,
            help="only rows with this status (repeatable; default: every status)",
        )
        parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch (default 1000)")
        parser.add_argument(
            "--pause", type=int, default=0, metavar="MS", help="sleep between batches (ms; default 0)"
        )
        parser.add_argument("--dry-run", action="store_true", help="only count what would be deleted")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            age = parse_duration(options["older_than"])
        except ValueError as e:
            raise CommandError(str(e)) from None
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        cutoff = timezone.now() - age
        if options["dry_run"]:
            queryset = DeadLetter.objects.filter(failed_at__lt=cutoff)
            if options["status"]:
                queryset = queryset.filter(status__in=options["status"])
            self.stdout.write(f"{queryset.count()} dead letters failed before {cutoff:%Y-%m-%d %H:%M:%S %Z}.")
            return
        total = 0
        for deleted in purge_dead_letters(
            failed_before=cutoff,
            statuses=options["status"],
            batch_size=options["batch_size"],
            pause=options["pause"] / 1000,
        ):
            total += deleted
            if options["verbosity"] >= 2:
                self.stdout.write(f"deleted {deleted} (total {total})")
        self.stdout.write(f"Deleted {total} dead letters that failed before {cutoff:%Y-%m-%d %H:%M:%S %Z}.")

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
        deleted += purge_expired_task_results(options["batch_size"])
        self.stdout.write(f"Deleted {deleted} expired results.")


def purge_expired_task_results(batch_size: int) -> int:
    """Expired results of Django ``@task`` functions, a batch at a time (each batch a
    short statement, so the table is never locked for long)."""
    from django.utils import timezone

    from djqueue.models import DjangoTaskResult

    deleted = 0
    while True:
        ids = list(
            DjangoTaskResult.objects.filter(expires_at__lt=timezone.now()).values_list("pk", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            return deleted
        deleted += DjangoTaskResult.objects.filter(pk__in=ids).delete()[0]

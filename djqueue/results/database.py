"""Results as TaskResult rows in the Django database (``RESULT_BACKEND = "db"``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, router, transaction
from django.utils import timezone

from .base import FAILED, SUCCEEDED, ResultBackend, StoredResult

GROUP_ACTOR_NAME = "(group)"
UPDATED_FIELDS = (
    "actor_name",
    "queue_name",
    "status",
    "result",
    "exception_type",
    "exception",
    "group_id",
    "finished_at",
    "expires_at",
)


class DatabaseResultBackend(ResultBackend):
    """Keeps each result as a ``TaskResult`` row until ``expires_at``.

    Expired rows are ignored when read and deleted by ``manage.py purgeresults``.
    Waiting polls the row at most a few times a second (see base.POLL_MAX).
    """

    def _alias(self) -> str:
        from ..models import TaskResult

        return router.db_for_write(TaskResult)

    def _get(self, message_id: str) -> StoredResult | None:
        from ..models import TaskResult

        row = (
            TaskResult.objects.filter(message_id=message_id)
            .values_list("status", "result", "exception_type", "exception", "expires_at")
            .first()
        )
        if row is None:
            return None
        status, value, exception_type, exception, expires_at = row
        if expires_at is not None and expires_at <= timezone.now():
            return None
        if status == FAILED:
            return StoredResult(FAILED, None, exception_type, exception)
        return StoredResult(SUCCEEDED, value)

    def _store(self, message: Any, stored: StoredResult, ttl: int) -> None:
        from ..models import TaskResult

        now = timezone.now()
        timestamp = getattr(message, "message_timestamp", None)
        row = TaskResult(
            message_id=message.message_id,
            actor_name=message.actor_name,
            queue_name=message.queue_name,
            status=stored.status,
            result=stored.value,
            exception_type=stored.exception_type[:255],
            exception=stored.exception_message,
            group_id=message.options.get("group_id") or "",
            created_at=dt.datetime.fromtimestamp(timestamp / 1000, tz=dt.UTC) if timestamp else now,
            finished_at=now,
            expires_at=now + dt.timedelta(milliseconds=ttl),
        )
        # One INSERT ... ON CONFLICT DO UPDATE: a message that runs again (redelivery, or a
        # retry after a stored failure) replaces its row.
        TaskResult.objects.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["message_id"],
            update_fields=list(UPDATED_FIELDS),
        )

    def count_group_completed(self, group_id: str) -> int:
        from ..models import TaskResult

        # Counting the rows, rather than keeping a counter, makes a member that ran twice
        # (at-least-once delivery) count once: its row is unique by message id.
        return TaskResult.objects.filter(
            group_id=group_id, status=SUCCEEDED, expires_at__gt=timezone.now()
        ).count()

    def run_once(self, key: str, ttl: int, fn: Callable[[], Any]) -> bool:
        from ..models import TaskResult

        now = timezone.now()
        with transaction.atomic(using=self._alias()):
            # The claim is a row of its own, unique by key; fn runs inside the same
            # transaction, so a failure (or a crash) before commit leaves no claim, and a
            # database broker on the same database enqueues atomically with it.
            TaskResult.objects.filter(message_id=key, expires_at__lte=now).delete()
            try:
                with transaction.atomic(using=self._alias()):
                    TaskResult.objects.create(
                        message_id=key,
                        actor_name=GROUP_ACTOR_NAME,
                        queue_name="",
                        status=SUCCEEDED,
                        finished_at=now,
                        expires_at=now + dt.timedelta(milliseconds=ttl),
                    )
            except IntegrityError:
                return False
            fn()
        return True

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        from ..models import TaskResult

        now = timezone.now()
        total = 0
        while True:
            # Small batches by primary key, each its own transaction: never a long lock.
            ids = list(
                TaskResult.objects.filter(expires_at__lte=now)
                .order_by()
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return total
            deleted, _ = TaskResult.objects.filter(pk__in=ids).delete()
            total += deleted

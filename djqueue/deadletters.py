"""Retrying and discarding dead letters: what the admin's actions and Retry button do.

A retry sends the original actor, arguments and options again as a NEW message (new
id, fresh retries, no eta) on the original queue, and marks the row ``retried`` with
that id, in one transaction. Rows are locked (``select_for_update``) and claimed by a
conditional UPDATE, so two operators retrying the same row at the same moment, or one
retrying it twice, enqueue it once.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.utils import timezone

from .errors import DjqueueError
from .message import Message
from .models import DeadLetter

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from .brokers.base import Broker

# Statuses from which a row may be retried: a discarded row can still be brought back.
RETRYABLE = (DeadLetter.Status.DEAD, DeadLetter.Status.DISCARDED)
# Options that belong to the failed delivery, not to the job.
DROPPED_OPTIONS = frozenset({"retries", "eta"})

ALREADY_RETRIED = "already retried"
MALFORMED = "malformed message (nothing to re-send)"


class CannotRetry(DjqueueError):
    """The dead letter cannot be retried; the message says why."""


@dataclass
class RetrySummary:
    """What a bulk retry did: (row, new message id) pairs, and skipped rows by reason."""

    retried: list[tuple[DeadLetter, str]] = field(default_factory=list)
    skipped: dict[str, list[DeadLetter]] = field(default_factory=dict)

    def skip(self, reason: str, row: DeadLetter) -> None:
        self.skipped.setdefault(reason, []).append(row)

    @property
    def skipped_count(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())


def _broker(broker: Broker | None) -> Broker:
    from .brokers import get_broker

    return broker or get_broker()


def retry_problem(row: DeadLetter, broker: Broker | None = None) -> str | None:
    """Why ``row`` cannot be retried, or None if it can."""
    if row.status == DeadLetter.Status.RETRIED:
        return ALREADY_RETRIED
    if row.is_malformed:
        return MALFORMED
    if _broker(broker).get_actor(row.actor_name) is None:
        return f"actor {row.actor_name} no longer exists"
    return None


def retry_message(row: DeadLetter) -> Message:
    """A fresh message for the job ``row`` holds: new id and timestamp, no retries or eta."""
    options = {key: value for key, value in (row.options or {}).items() if key not in DROPPED_OPTIONS}
    return Message(
        queue_name=row.queue_name,
        actor_name=row.actor_name,
        args=tuple(row.args or ()),
        kwargs=dict(row.kwargs or {}),
        options=options,
    )


def retry_dead_letters(
    rows: QuerySet[DeadLetter] | Iterable[Any], *, broker: Broker | None = None
) -> RetrySummary:
    """Re-enqueue the jobs of ``rows`` (a queryset, or primary keys); see the module doc."""
    broker = _broker(broker)
    if hasattr(rows, "values_list"):
        alias = rows.db
        pks = list(rows.order_by().values_list("pk", flat=True))
    else:
        alias = DeadLetter.objects.db
        pks = list(rows)
    summary = RetrySummary()
    with transaction.atomic(using=alias):
        # Locked in primary-key order, so that two overlapping bulk retries cannot deadlock.
        locked = DeadLetter.objects.using(alias).filter(pk__in=pks).select_for_update().order_by("pk")
        for row in locked:
            problem = retry_problem(row, broker)
            if problem is None:
                problem = _retry_one(row, broker, alias)
            if problem is not None:
                summary.skip(problem, row)
            else:
                summary.retried.append((row, row.retried_message_id))
    return summary


class _NotClaimed(Exception):
    pass


def _retry_one(row: DeadLetter, broker: Broker, alias: str) -> str | None:
    """Mark ``row`` retried and enqueue its job, both or neither; None, or why not."""
    message = retry_message(row)
    now = timezone.now()
    try:
        with transaction.atomic(using=alias):
            # The claim: only one transaction can move the row out of a retryable status,
            # even on a database where select_for_update locks nothing (SQLite).
            claimed = (
                DeadLetter.objects.using(alias)
                .filter(pk=row.pk, status__in=RETRYABLE)
                .update(
                    status=DeadLetter.Status.RETRIED, retried_message_id=message.message_id, retried_at=now
                )
            )
            if not claimed:
                raise _NotClaimed
            # Inside the savepoint: if the broker refuses the message, the row stays
            # dead; a database broker on the same database commits both together.
            broker.enqueue(message)
    except _NotClaimed:
        return ALREADY_RETRIED
    except DjqueueError as e:
        # Refused (e.g. another message holds its unique_key) or the broker is down.
        return f"not enqueued: {e}"
    row.status, row.retried_message_id, row.retried_at = DeadLetter.Status.RETRIED, message.message_id, now
    return None


def retry_dead_letter(row: DeadLetter, *, broker: Broker | None = None) -> str:
    """Retry one dead letter; returns the new message id. Raises CannotRetry."""
    summary = retry_dead_letters([row.pk], broker=broker)
    if not summary.retried:
        reason = next(iter(summary.skipped), "it no longer exists")
        raise CannotRetry(f"dead letter {row.message_id} cannot be retried: {reason}")
    return summary.retried[0][1]


def discard_dead_letters(rows: QuerySet[DeadLetter]) -> list[DeadLetter]:
    """Mark the ``dead`` rows among ``rows`` as ``discarded``; returns those rows."""
    with transaction.atomic(using=rows.db):
        pending = list(rows.filter(status=DeadLetter.Status.DEAD).select_for_update().order_by("pk"))
        DeadLetter.objects.using(rows.db).filter(
            pk__in=[row.pk for row in pending], status=DeadLetter.Status.DEAD
        ).update(status=DeadLetter.Status.DISCARDED)
    for row in pending:
        row.status = DeadLetter.Status.DISCARDED
    return pending


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(text: str) -> dt.timedelta:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"500ms"`` or ``"2w"`` as a timedelta."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit, e.g. 30d, 12h, 90m, 45s")
    return dt.timedelta(milliseconds=int(match.group(1)) * _UNIT_MS[match.group(2)])


def purge_dead_letters(
    *,
    failed_before: dt.datetime,
    statuses: Iterable[str] | None = None,
    batch_size: int = 1000,
    pause: float = 0.0,
    using: str | None = None,
) -> Iterator[int]:
    """Delete the rows that failed before ``failed_before``, ``batch_size`` at a time.

    Yields the number deleted by each batch. Each batch is its own short transaction
    (primary keys found through the ``failed_at`` index, then deleted by key), so the
    table is never locked for long; ``pause`` seconds between batches let other
    writers through on a busy database.
    """
    queryset = DeadLetter.objects.using(using or DeadLetter.objects.db).filter(failed_at__lt=failed_before)
    if statuses:
        queryset = queryset.filter(status__in=list(statuses))
    while True:
        pks = list(queryset.order_by().values_list("pk", flat=True)[:batch_size])
        if not pks:
            return
        deleted, _ = DeadLetter.objects.using(queryset.db).filter(pk__in=pks).delete()
        yield deleted
        if pause:
            time.sleep(pause)

"""manage.py purgedeadletters: old rows go, in batches; recent ones stay."""

from __future__ import annotations

import datetime as dt
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from djqueue.deadletters import parse_duration
from djqueue.models import DeadLetter

pytestmark = pytest.mark.django_db


def make(count: int, days_ago: float, status: str = "dead") -> None:
    failed_at = timezone.now() - dt.timedelta(days=days_ago)
    DeadLetter.objects.bulk_create(
        DeadLetter(
            message_id=f"{days_ago}-{status}-{n}",
            queue_name="q",
            actor_name="a",
            failed_at=failed_at,
            status=status,
        )
        for n in range(count)
    )


def run(*args: str) -> str:
    out = StringIO()
    call_command("purgedeadletters", *args, stdout=out)
    return out.getvalue()


def test_old_rows_are_deleted_in_batches():
    make(25, days_ago=45)
    make(5, days_ago=10)
    assert "25 dead letters failed before" in run("--older-than", "30d", "--dry-run")
    assert DeadLetter.objects.count() == 30
    with CaptureQueriesContext(connection) as queries:
        assert "Deleted 25 dead letters" in run("--older-than", "30d", "--batch-size", "10")
    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3 and all("IN (" in sql for sql in deletes)  # by primary key, 10 at a time
    assert DeadLetter.objects.count() == 5


def test_only_the_given_statuses():
    make(3, days_ago=60, status="dead")
    make(4, days_ago=60, status="retried")
    make(2, days_ago=60, status="discarded")
    assert "Deleted 6 dead letters" in run(
        "--older-than", "1w", "--status", "retried", "--status", "discarded"
    )
    assert list(DeadLetter.objects.values_list("status", flat=True).distinct()) == ["dead"]


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(CommandError, match="not a duration"):
        run("--older-than", "thirty days")
    with pytest.raises(CommandError, match="--batch-size"):
        run("--older-than", "30d", "--batch-size", "0")
    assert parse_duration("500ms") == dt.timedelta(milliseconds=500)
    assert parse_duration("12h") == dt.timedelta(hours=12)
    assert parse_duration("2w") == dt.timedelta(days=14)

"""manage.py purgeresults: expired rows go, in batches; live ones stay."""

from __future__ import annotations

import datetime as dt
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from djqueue.models import TaskResult
from djqueue.results import set_result_backend
from djqueue.results.database import DatabaseResultBackend

pytestmark = pytest.mark.django_db


def test_expired_results_are_purged_and_live_ones_kept():
    set_result_backend(DatabaseResultBackend(ttl=60_000))
    try:
        now = timezone.now()
        TaskResult.objects.bulk_create(
            TaskResult(
                message_id=f"old-{n}",
                actor_name="a",
                queue_name="q",
                status="succeeded",
                expires_at=now - dt.timedelta(seconds=1),
            )
            for n in range(7)
        )
        TaskResult.objects.create(
            message_id="live",
            actor_name="a",
            queue_name="q",
            status="succeeded",
            expires_at=now + dt.timedelta(hours=1),
        )
        out = StringIO()
        call_command("purgeresults", "--batch-size", "3", stdout=out)
        assert "Deleted 7 expired results." in out.getvalue()
        assert list(TaskResult.objects.values_list("message_id", flat=True)) == ["live"]
    finally:
        set_result_backend(None)


def test_expired_django_task_results_are_purged_too():
    from djqueue.models import DjangoTaskResult

    now = timezone.now()
    for n, expires in enumerate([now - dt.timedelta(seconds=1)] * 4 + [now + dt.timedelta(hours=1)]):
        DjangoTaskResult.objects.create(
            id=f"task-{n}", task_path="app.tasks.f", backend="default", queue_name="q", expires_at=expires
        )
    out = StringIO()
    call_command("purgeresults", "--batch-size", "3", stdout=out)
    assert "Deleted 4 expired results." in out.getvalue()
    assert list(DjangoTaskResult.objects.values_list("id", flat=True)) == ["task-4"]

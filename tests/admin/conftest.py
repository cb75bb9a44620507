from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import Permission

from djqueue.models import DeadLetter


def staff_client(client: Any, django_user_model: Any, username: str, *codenames: str) -> Any:
    # No password: hashing one costs more than the rest of a test.
    user = django_user_model.objects.create_user(username, is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="djqueue", codename__in=codenames)
    )
    client.force_login(user)
    return client


@pytest.fixture
def operator_client(client, django_user_model):
    """Staff who may see, retry and discard dead letters."""
    return staff_client(
        client, django_user_model, "operator", "view_deadletter", "change_deadletter", "retry_deadletter"
    )


@pytest.fixture
def viewer_client(client, django_user_model):
    """Staff who may only look."""
    return staff_client(client, django_user_model, "viewer", "view_deadletter", "view_taskresult")


def make_dead_letter(**fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "queue_name": "default",
        "actor_name": "record",
        "args": ["value"],
        "kwargs": {},
        "options": {"retries": 3, "eta": 1, "max_age": 60_000},
        "exception_type": "ValueError",
        "exception_message": "it failed",
        "traceback": "Traceback (most recent call last):\nValueError: it failed",
        "retries": 3,
    }
    values.update(fields)
    return DeadLetter.objects.create(**values)


def changelist_action(client: Any, action: str, rows: list[DeadLetter], **extra: str) -> Any:
    data = {"action": action, "_selected_action": [row.pk for row in rows], "index": "0", **extra}
    return client.post("/admin/djqueue/deadletter/", data, follow=True)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


@pytest.fixture
def admin_user(db: Any, django_user_model: Any) -> Any:
    """pytest-django's superuser, without a password to hash (force_login needs none)."""
    return django_user_model.objects.create_superuser("admin", email="admin@example.com", password=None)

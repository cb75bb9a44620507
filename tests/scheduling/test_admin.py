"""The schedule screens: ScheduleRun rows (read-only) and the configured entries."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

import djqueue.scheduling.admin  # noqa: F401 - registers the screens (djqueue.admin imports it too)
from djqueue.models import ScheduleRun

pytestmark = pytest.mark.django_db

CRONTABS = {
    "nightly-<report>": {
        "actor": "record",
        "schedule": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "args": ["<b>"],
    },
    "paused": {"actor": "record", "schedule": "@hourly", "enabled": False, "catch_up": "skip"},
    "broken": {"actor": "record", "schedule": "99 * * * *"},
}


@pytest.fixture
def crontabs(settings):
    settings.DJQUEUE = {**settings.DJQUEUE, "CRONTABS": CRONTABS}


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "admin@example.com", "pw")
    client.force_login(user)
    return client


def test_the_runs_list_is_read_only_with_filters(admin_client):
    run = ScheduleRun.objects.create(
        name="nightly", fire_time=datetime(2024, 3, 31, 1, 0, tzinfo=UTC), message_id="m-1"
    )
    ScheduleRun.objects.create(
        name="other", fire_time=datetime(2024, 3, 31, 1, 0, tzinfo=UTC), message_id="m-2"
    )
    url = reverse("admin:djqueue_schedulerun_changelist")
    page = admin_client.get(url).content.decode()
    assert "m-1" in page and "m-2" in page
    assert reverse("admin:djqueue_schedulerun_schedules") in page, "a link to the configured schedules"
    assert reverse("admin:djqueue_schedulerun_add") not in page
    filtered = admin_client.get(url, {"name": "nightly"}).content.decode()
    assert "m-1" in filtered and "m-2" not in filtered
    searched = admin_client.get(url, {"q": "m-2"}).content.decode()
    assert "m-2" in searched and "m-1" not in searched
    change = admin_client.get(reverse("admin:djqueue_schedulerun_change", args=[run.pk]))
    assert change.status_code == 200 and b'name="_save"' not in change.content
    assert admin_client.post(reverse("admin:djqueue_schedulerun_delete", args=[run.pk])).status_code == 403


def test_the_schedules_page_lists_entries_and_next_fire_times(admin_client, crontabs):
    ScheduleRun.objects.create(name="paused", fire_time=datetime(2024, 1, 1, 12, tzinfo=UTC))
    response = admin_client.get(reverse("admin:djqueue_schedulerun_schedules"))
    assert response.status_code == 200
    page = response.content.decode()
    # Names and arguments are escaped, never rendered as HTML.
    assert "nightly-&lt;report&gt;" in page and "&#x27;&lt;b&gt;&#x27;" in page and "<b>" not in page
    assert page.count('class="djq-fire-time"') == 5, "five upcoming times of the enabled entry"
    assert "+01:00" in page or "+02:00" in page, "in the entry's time zone"
    assert '<span class="djq-warning">disabled</span>' in page
    assert "2024-01-01T12:00:00+00:00" in page, "the last run"
    assert "out of range" in page, "a bad entry shows its error instead of breaking the page"


def test_the_schedules_page_needs_the_view_permission(client, crontabs):
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(user)
    url = reverse("admin:djqueue_schedulerun_schedules")
    assert client.get(url).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_schedulerun"))
    assert client.get(url).status_code == 200

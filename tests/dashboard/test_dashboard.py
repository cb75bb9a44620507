"""The admin dashboard page: who may see it, and what it shows."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest
from django.contrib.auth.models import Permission, User
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from djqueue import actor
from djqueue.dashboard import STALE_AFTER, chart, queue_overview, throughput
from djqueue.models import DeadLetter, ThroughputMinute, WorkerHeartbeat

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.dashboard.urls"),
]


@pytest.fixture
def queue() -> str:
    return f"d_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def filled(stub_broker, queue):
    """A queue with 2 ready and 1 delayed messages, 1 dead letter, a live and a dead
    worker, and throughput in the last hour."""

    @actor(broker=stub_broker, actor_name=f"job_{queue}", queue_name=queue)
    def job(n: int) -> None: ...

    job.send(1)
    job.send(2)
    job.send_with_options(args=(3,), delay=600_000)
    DeadLetter.objects.create(message_id=str(uuid.uuid4()), queue_name=queue, actor_name=job.actor_name)
    DeadLetter.objects.create(
        message_id=str(uuid.uuid4()), queue_name=queue, actor_name=job.actor_name, status="retried"
    )
    now = timezone.now()
    WorkerHeartbeat.objects.create(
        worker_id="web-1:101", hostname="web-1", pid=101, queues=[queue], threads=8, processed=42, failed=3
    )
    WorkerHeartbeat.objects.create(
        worker_id="web-2:202", hostname="web-2", pid=202, queues=["other_q"], threads=4,
        last_seen=now - STALE_AFTER - dt.timedelta(seconds=1),
    )  # fmt: skip
    minute = now.replace(second=0, microsecond=0)
    ThroughputMinute.objects.create(minute=minute - dt.timedelta(minutes=5), processed=120, failed=7)
    ThroughputMinute.objects.create(minute=minute, processed=30, failed=0)
    ThroughputMinute.objects.create(minute=minute - dt.timedelta(minutes=61), processed=999, failed=999)
    return job


def staff(*perms: str) -> User:
    user = User.objects.create_user(f"u{uuid.uuid4().hex[:6]}", password="pw", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def test_staff_who_may_view_dead_letters_see_the_dashboard(client, filled, queue):
    client.force_login(staff("djqueue.view_deadletter"))
    response = client.get(reverse("djqueue_dashboard"))
    assert response.status_code == 200
    html = response.content.decode()
    row = re.search(rf"<th scope=\"row\">{queue}</th>(.*?)</tr>", html, re.S).group(1)
    cells = [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[:4] == ["2", "1", "0", "0"], cells  # ready, delayed, in flight, dead (broker)
    assert re.sub(r"<[^>]+>", "", cells[4]).strip() == "1"  # the retried row is not counted
    assert "web-1:101" in html and "web-2:202" in html
    assert html.count('class="djq-alive"') == 1 and html.count('class="djq-dead"') == 1
    assert '<svg class="djq-chart"' in html
    assert "<strong>150</strong> processed" in html and "<strong>7</strong> failed" in html
    assert response.context["alive_workers"] == 1


def test_users_who_are_not_staff_are_sent_to_the_login(client, filled):
    user = User.objects.create_user("visitor", password="pw")
    client.force_login(user)
    response = client.get(reverse("djqueue_dashboard"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.logout()
    assert client.get(reverse("djqueue_dashboard")).status_code == 302


def test_staff_without_the_permission_are_refused(client, filled):
    client.force_login(staff())
    assert client.get(reverse("djqueue_dashboard")).status_code == 403


def test_the_page_is_read_only(client, filled):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    assert client.post(reverse("djqueue_dashboard")).status_code == 405


def test_auto_refresh_only_when_asked(client, filled):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    url = reverse("djqueue_dashboard")
    assert 'http-equiv="refresh"' not in client.get(url).content.decode()
    assert '<meta http-equiv="refresh" content="10">' in client.get(url + "?refresh=10").content.decode()
    assert 'http-equiv="refresh"' not in client.get(url + "?refresh=99999").content.decode()


def test_user_supplied_names_are_escaped(client, stub_broker):
    DeadLetter.objects.create(message_id=str(uuid.uuid4()), queue_name="q", actor_name="a")
    WorkerHeartbeat.objects.create(worker_id="<b>x</b>:1", hostname="<script>alert(1)</script>", pid=1)
    client.force_login(User.objects.create_superuser("root", password="pw"))
    html = client.get(reverse("djqueue_dashboard")).content.decode()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html


def test_a_broker_error_is_shown_not_raised(client):
    from djqueue.brokers import broker_from_url

    broken = broker_from_url("redis://127.0.0.1:1/0")
    rows = queue_overview(broken, ["q1"])
    assert rows[0].ready is None and rows[0].error


def test_throughput_fills_every_minute_of_the_hour():
    now = timezone.now()
    minute = now.replace(second=0, microsecond=0)
    ThroughputMinute.objects.create(minute=minute - dt.timedelta(minutes=2), processed=5, failed=1)
    points = throughput(now)
    assert len(points) == 60 and points[-1][0] == minute
    assert points[-3][1:] == (5, 1) and sum(p for _, p, _ in points) == 5


@override_settings(TIME_ZONE="Europe/Berlin")
def test_chart_scale_and_labels():
    start = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)
    points = [(start + dt.timedelta(minutes=i), 37 if i == 3 else 0, 2 if i == 3 else 0) for i in range(60)]
    geometry = chart(points)
    assert [g["value"] for g in geometry["gridlines"]] == [0, 10, 20, 30, 40]
    assert [label["text"] for label in geometry["labels"]] == [
        "10:00",
        "10:10",
        "10:20",
        "10:30",
        "10:40",
        "10:50",
    ]
    bar = geometry["bars"][3]
    assert bar["processed_h"] > bar["failed_h"] > 0
    assert bar["title"] == "10:03: 37 processed, 2 failed"
    empty = chart([(start, 0, 0)])
    assert [g["value"] for g in empty["gridlines"]] == [0, 1, 2, 3, 4]

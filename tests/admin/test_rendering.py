"""What the admin screens show: escaped user data, no secrets, warnings, filters, and
a bounded number of queries whatever the table size."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from djqueue import actor
from djqueue.admin.helpers import LargeTablePaginator, distinct_values, redact
from djqueue.models import DeadLetter, TaskResult

from .conftest import changelist_action, make_dead_letter, messages_of

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert('x')</script>"


def test_user_data_is_escaped_everywhere(admin_client, stub_broker):
    row = make_dead_letter(
        args=[SCRIPT],
        kwargs={"html": "<b>bold</b>"},
        options={"note": SCRIPT},
        exception_type="<img src=x onerror=alert(1)>",
        exception_message=f"failed on {SCRIPT}",
        traceback=f'File "x.py"\n  raise ValueError("{SCRIPT}")',
    )
    for url in ("/admin/djqueue/deadletter/", f"/admin/djqueue/deadletter/{row.pk}/change/"):
        html = admin_client.get(url).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html
        assert "&lt;script&gt;alert(" in html
    page = admin_client.get(f"/admin/djqueue/deadletter/{row.pk}/change/").content.decode()
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # pretty JSON, escaped
    assert "raise ValueError(&quot;&lt;script&gt;" in page  # the traceback, escaped


def test_malformed_messages_show_the_raw_payload_escaped_and_cannot_be_retried(admin_client, stub_broker):
    row = make_dead_letter(
        actor_name="",
        raw_payload='{"broken": "' + SCRIPT,
        exception_type="DecodeError",
        exception_message="payload is not valid JSON",
    )
    page = admin_client.get(f"/admin/djqueue/deadletter/{row.pk}/change/").content.decode()
    assert "{&quot;broken&quot;: &quot;&lt;script&gt;" in page and "<script>alert" not in page
    assert "cannot be retried: malformed message" in page and "/retry/" not in page
    assert "⚠ malformed" in admin_client.get("/admin/djqueue/deadletter/").content.decode()
    response = changelist_action(admin_client, "retry_dead_letters", [row])
    assert any("malformed message" in m for m in messages_of(response))
    row.refresh_from_db()
    assert row.status == "dead" and stub_broker.get_queue_stats("default").ready == 0


def test_an_actor_that_no_longer_exists_is_flagged_and_not_retried(admin_client, stub_broker):
    row = make_dead_letter(actor_name="shop.tasks.renamed_away")
    assert "⚠ unknown actor" in admin_client.get("/admin/djqueue/deadletter/").content.decode()
    page = admin_client.get(f"/admin/djqueue/deadletter/{row.pk}/change/").content.decode()
    assert "cannot be retried: actor shop.tasks.renamed_away no longer exists" in page
    assert f"/admin/djqueue/deadletter/{row.pk}/retry/" not in page
    admin_client.post(f"/admin/djqueue/deadletter/{row.pk}/retry/")
    row.refresh_from_db()
    assert row.status == "dead"


def test_no_secret_is_shown(admin_client, stub_broker):
    row = make_dead_letter(
        exception_message="cannot connect to redis://:hunter2@cache:6379/0",
        traceback="ConnectionError: amqp://guest:s3cr3t@rabbit:5672/%2F refused",
        kwargs={"url": "postgres://app:pa55word@db/app"},
    )
    for url in ("/admin/djqueue/deadletter/", f"/admin/djqueue/deadletter/{row.pk}/change/"):
        html = admin_client.get(url).content.decode()
        assert "hunter2" not in html and "s3cr3t" not in html and "pa55word" not in html
    assert "amqp://guest:***@rabbit" in html
    assert (
        redact("redis://user:p@ss@host/0 and http://plain.example/")
        == "redis://user:***@host/0 and http://plain.example/"
    )


def test_the_list_costs_the_same_queries_for_60_or_300_rows(
    admin_client, stub_broker, django_assert_max_num_queries
):
    @actor(broker=stub_broker, actor_name="record")
    def record() -> None: ...

    def add(count: int, actor_name: str) -> None:
        DeadLetter.objects.bulk_create(
            DeadLetter(message_id=f"{actor_name}-{n}", queue_name="default", actor_name=actor_name)
            for n in range(count)
        )

    add(60, "record")
    with django_assert_max_num_queries(12) as few:
        admin_client.get("/admin/djqueue/deadletter/")
    add(240, "shop.tasks.gone")  # unknown actors are flagged without a query each
    with django_assert_max_num_queries(len(few.captured_queries)) as many:
        response = admin_client.get("/admin/djqueue/deadletter/?p=2")
    assert response.context["cl"].result_count == 300
    assert len(response.context["cl"].result_list) == 50
    assert not any('COUNT(*) FROM "djqueue_deadletter"' in q["sql"] for q in many.captured_queries)
    assert not any("DISTINCT" in q["sql"] for q in many.captured_queries)


def test_filters_search_and_date_hierarchy(admin_client, stub_broker):
    now = timezone.now()
    old = make_dead_letter(
        actor_name="shop.tasks.a", queue_name="mail", failed_at=now - dt.timedelta(days=400)
    )
    new = make_dead_letter(
        actor_name="shop.tasks.b", queue_name="default", exception_message="Disk quota exceeded"
    )
    retried = make_dead_letter(actor_name="shop.tasks.b", status="retried")

    def listed(query: str) -> set[int]:
        response = admin_client.get(f"/admin/djqueue/deadletter/?{query}")
        assert response.status_code == 200, query
        return {row.pk for row in response.context["cl"].result_list}

    assert listed("") == {old.pk, new.pk, retried.pk}
    assert listed("actor_name=shop.tasks.b") == {new.pk, retried.pk}
    assert listed("queue_name=mail") == {old.pk}
    assert listed("status__exact=retried") == {retried.pk}
    assert listed(f"q={new.message_id}") == {new.pk}
    assert listed("q=quota") == {new.pk}
    month = f"failed_at__year={old.failed_at.year}&failed_at__month={old.failed_at.month}"
    assert listed(month) == {old.pk}
    assert listed(f"{month}&failed_at__day={old.failed_at.day}") == {old.pk}
    html = admin_client.get("/admin/djqueue/deadletter/").content.decode()
    assert f"failed_at__year={old.failed_at.year}" in html and f"failed_at__year={now.year}" in html
    assert 'value="shop.tasks.a"' in html or "actor_name=shop.tasks.a" in html
    assert distinct_values(DeadLetter.objects.all(), "actor_name") == ["shop.tasks.a", "shop.tasks.b"]


def test_the_paginator_bounds_its_count(stub_broker):
    for _ in range(12):
        make_dead_letter()
    queryset = DeadLetter.objects.order_by("-failed_at")

    class Small(LargeTablePaginator):
        count_limit = 5

    last = Small(queryset, 5, page_number=3)
    assert (last.count, last.count_note) == (12, "")  # the last page tells the exact count
    first = Small(queryset, 5, page_number=1)
    # Past the limit, SQLite gets a lower bound (PostgreSQL the planner's estimate).
    assert (first.count, first.count_note) == (6, "at least ")
    second = Small(queryset, 5, page_number=2)
    assert (second.count, second.count_note) == (11, "at least ")
    with CaptureQueriesContext(connection) as queries:
        assert [row.pk for row in second.page(2).object_list] == [row.pk for row in queryset[5:10]]
    assert len(queries) == 1  # the queryset[5:10] above; the page itself was already read


@pytest.mark.postgres
@pytest.mark.django_db(databases=["default", "postgres"])
def test_the_paginator_estimates_on_postgresql():
    DeadLetter.objects.using("postgres").bulk_create(
        DeadLetter(message_id=f"m{n}", queue_name="q", actor_name="a") for n in range(30)
    )
    queryset = DeadLetter.objects.using("postgres").order_by("-failed_at")

    class Small(LargeTablePaginator):
        count_limit = 5

    paginator = Small(queryset, 5, page_number=1)
    assert paginator.count >= 6 and paginator.count_note == "about "


def test_results_are_read_only_with_filters_and_search(admin_client, viewer_client):
    now = timezone.now()
    ok = TaskResult.objects.create(
        message_id="1d4b9b4e-3c1a-4c9e-bb0e-2f7f1f1c0a01",
        actor_name="a",
        queue_name="q",
        status="succeeded",
        result={"html": SCRIPT},
        group_id="7e0b8b1e-0c8f-4b8a-9a49-0d5a5e1f2b02",
        expires_at=now,
    )
    bad = TaskResult.objects.create(
        message_id="2d4b9b4e-3c1a-4c9e-bb0e-2f7f1f1c0a02",
        actor_name="b",
        queue_name="q",
        status="failed",
        exception_type="ValueError",
        exception="redis://:hunter2@h/0 " + SCRIPT,
        expires_at=now,
    )
    for client in (admin_client, viewer_client):
        html = client.get("/admin/djqueue/taskresult/").content.decode()
        assert "hunter2" not in html and "<script>alert" not in html and ok.message_id in html
        page = client.get(f"/admin/djqueue/taskresult/{ok.pk}/change/").content.decode()
        assert "&lt;script&gt;" in page and 'name="_save"' not in page
    assert admin_client.get("/admin/djqueue/taskresult/add/").status_code == 403
    assert admin_client.post(f"/admin/djqueue/taskresult/{ok.pk}/delete/").status_code == 403

    def listed(query: str) -> set[int]:
        return {
            r.pk for r in admin_client.get(f"/admin/djqueue/taskresult/?{query}").context["cl"].result_list
        }

    assert listed("status__exact=failed") == {bad.pk}
    assert listed(f"q={ok.group_id}") == {ok.pk}
    assert listed(f"q={bad.message_id}") == {bad.pk}
    assert listed("actor_name=a") == {ok.pk}


def test_a_preview_cut_inside_a_password_does_not_show_it(admin_client, stub_broker):
    # The list reads the first 120 characters of the message: they end inside the password.
    make_dead_letter(exception_message="cannot connect to redis://app:" + "s" * 150 + "@cache:6379/0")
    html = admin_client.get("/admin/djqueue/deadletter/").content.decode()
    assert "sss" not in html
    assert redact("connect redis://app:secr", cut=True) == "connect redis://app:***"


def test_an_inexact_count_says_so(admin_client, stub_broker, monkeypatch):
    monkeypatch.setattr(LargeTablePaginator, "count_limit", 5)
    DeadLetter.objects.bulk_create(
        DeadLetter(message_id=f"m{n}", queue_name="q", actor_name="a", status="dead") for n in range(60)
    )
    html = admin_client.get("/admin/djqueue/deadletter/?status__exact=dead").content.decode()
    assert "at least 51 dead letters" in html  # the paginator
    assert "at least 51 results" in html  # the search bar, as the list is filtered
    html = admin_client.get("/admin/djqueue/deadletter/?status__exact=dead&p=2").content.decode()
    assert "\n60 dead letters" in html  # the last page knows

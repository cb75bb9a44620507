"""The django.tasks results screen (DjangoTaskResult rows): read-only, escaped, and
refused to staff without the view permission."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from djqueue.models import DjangoTaskResult

from .conftest import staff_client

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert('x')</script>"
LIST = "/admin/djqueue/djangotaskresult/"


def make_task_result(**fields) -> DjangoTaskResult:
    values = {
        "id": "3f2b8c1e-5a0d-4e7b-9c1f-0a1b2c3d4e5f",
        "task_path": "shop.tasks.send_receipt",
        "backend": "default",
        "queue_name": "default",
        "args": [1],
        "kwargs": {},
    }
    values.update(fields)
    return DjangoTaskResult.objects.create(**values)


def page_of(row: DjangoTaskResult) -> str:
    return f"{LIST}{row.pk}/change/"


def test_user_data_is_escaped_and_secrets_masked(admin_client):
    now = timezone.now()
    done = make_task_result(
        id="0b7c2d4e-1111-4e7b-9c1f-0a1b2c3d4e5f",
        status="SUCCESSFUL",
        args=[SCRIPT],
        kwargs={"html": "<b>bold</b>"},
        return_value={"page": SCRIPT},
        worker_ids=[SCRIPT],
        started_at=now,
        finished_at=now,
    )
    failed = make_task_result(
        id="0b7c2d4e-2222-4e7b-9c1f-0a1b2c3d4e5f",
        task_path="shop.tasks.<img src=x onerror=alert(1)>",
        status="FAILED",
        errors=[
            {
                "exception_class_path": "<img src=x onerror=alert(2)>",
                "traceback": f'File "x.py"\n  raise ValueError("{SCRIPT}")\nredis://:hunter2@cache/0',
            }
        ],
    )
    for url in (LIST, page_of(done), page_of(failed)):
        html = admin_client.get(url).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html, url
        assert "hunter2" not in html, url
    page = admin_client.get(page_of(done)).content.decode()
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # the kwargs, as escaped JSON
    assert "&quot;page&quot;: &quot;&lt;script&gt;alert(" in page  # the return value
    page = admin_client.get(page_of(failed)).content.decode()
    assert "&lt;img src=x onerror=alert(2)&gt;" in page  # the exception class path
    assert "raise ValueError(&quot;&lt;script&gt;" in page and "redis://:***@cache/0" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in admin_client.get(LIST).content.decode()  # the task path


def test_staff_without_the_view_permission_are_refused(django_user_model):
    row = make_task_result()
    # Staff, and even allowed to see djqueue's other screens, but not this one.
    others = staff_client(Client(), django_user_model, "others", "view_deadletter", "view_taskresult")
    nobody = staff_client(Client(), django_user_model, "nobody")
    for client in (others, nobody):
        assert client.get(LIST).status_code == 403
        assert client.get(page_of(row)).status_code == 403
        assert "djangotaskresult" not in client.get("/admin/djqueue/").content.decode()
    anonymous = Client().get(LIST)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]

    viewer = staff_client(Client(), django_user_model, "viewer", "view_djangotaskresult")
    assert viewer.get(LIST).status_code == 200
    assert viewer.get(page_of(row)).status_code == 200


def test_nobody_adds_changes_or_deletes_rows(admin_client):
    row = make_task_result(status="RUNNING")
    page = admin_client.get(page_of(row)).content.decode()
    assert 'name="_save"' not in page and "<textarea" not in page and '<input type="text"' not in page
    assert admin_client.post(page_of(row), {"status": "SUCCESSFUL"}).status_code == 403
    assert admin_client.get(f"{LIST}add/").status_code == 403
    assert admin_client.post(f"{LIST}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    response = admin_client.post(LIST, {"action": "delete_selected", "_selected_action": [row.pk]})
    assert response.status_code in (200, 302)
    assert "delete_selected" not in admin_client.get(LIST).content.decode()
    row.refresh_from_db()
    assert row.status == "RUNNING"


def test_the_list_filters_and_searches(admin_client):
    now = timezone.now()
    ready = make_task_result(id="1a000000-0000-4000-8000-000000000001", task_path="shop.tasks.a")
    running = make_task_result(
        id="1a000000-0000-4000-8000-000000000002",
        task_path="shop.tasks.b",
        status="RUNNING",
        enqueued_at=now - dt.timedelta(minutes=1),
        started_at=now,
    )
    local = make_task_result(id="local-1700000000000", task_path="billing.tasks.c", status="FAILED")

    def listed(query: str) -> set[str]:
        response = admin_client.get(f"{LIST}?{query}")
        assert response.status_code == 200, query
        return {row.pk for row in response.context["cl"].result_list}

    assert listed("") == {ready.pk, running.pk, local.pk}
    assert listed("status__exact=RUNNING") == {running.pk}
    assert listed(f"q={ready.pk}") == {ready.pk}
    assert listed("q=local-1700000000000") == {local.pk}  # not a uuid: still found by id
    assert listed("q=shop.tasks") == {ready.pk, running.pk}
    response = admin_client.get(LIST)
    assert [row.pk for row in response.context["cl"].result_list][-1] == running.pk  # newest first
    html = response.content.decode()
    assert "Django task results" in html and ">running<" in html and "shop.<wbr>tasks.<wbr>b" in html


def test_the_list_does_not_read_arguments_or_tracebacks(admin_client):
    for n in range(3):
        make_task_result(
            id=f"2b000000-0000-4000-8000-00000000000{n}",
            args=["x" * 10_000],
            errors=[{"exception_class_path": "builtins.ValueError", "traceback": "t" * 10_000}],
        )
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(LIST)
    rows_query = [q["sql"] for q in queries if 'FROM "djqueue_djangotaskresult"' in q["sql"]]
    assert rows_query
    assert not any(f'"djqueue_djangotaskresult"."{column}"' in sql for sql in rows_query for column in (
        "args", "kwargs", "errors", "return_value"
    ))  # fmt: skip

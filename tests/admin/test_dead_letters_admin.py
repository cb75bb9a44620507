"""The dead letters admin, through Django's test client, with an in-process worker."""

from __future__ import annotations

import threading

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connections
from django.test import Client

from djqueue import actor
from djqueue.deadletters import retry_dead_letters
from djqueue.models import DeadLetter

from .conftest import changelist_action, make_dead_letter, messages_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def repairable(stub_broker):
    """An actor that fails until ``state["fixed"]`` is set, as after a deploy."""
    state = {"fixed": False, "ran": []}

    @actor(
        broker=stub_broker,
        actor_name="shop.tasks.send_receipt",
        max_retries=1,
        min_backoff=10,
        max_backoff=20,
    )
    def send_receipt(order_id: int, *, copy: bool = False) -> None:
        if not state["fixed"]:
            raise ConnectionRefusedError("mail server down")
        state["ran"].append((order_id, copy))

    state["actor"] = send_receipt
    return state


@pytest.mark.django_db(transaction=True)
def test_a_failing_job_becomes_a_row_that_an_operator_retries(
    stub_broker, stub_worker, repairable, operator_client
):
    sent = repairable["actor"].send_with_options(args=(42,), kwargs={"copy": True}, priority=5)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    row = DeadLetter.objects.get(message_id=sent.message_id)
    assert row.status == "dead" and row.exception_type == "ConnectionRefusedError" and row.retries == 1

    repairable["fixed"] = True
    response = changelist_action(operator_client, "retry_dead_letters", [row])
    assert response.status_code == 200
    row.refresh_from_db()
    assert row.status == "retried"
    assert row.retried_message_id and row.retried_message_id != sent.message_id
    assert any(
        f"Retried 1 dead letter as new message(s) {row.retried_message_id}" in m
        for m in messages_of(response)
    )
    stub_worker.join(timeout=10_000)
    assert repairable["ran"] == [(42, True)]
    log = LogEntry.objects.get(object_id=str(row.pk))
    assert log.user.username == "operator" and row.retried_message_id in log.get_change_message()

    # The same row again, from the list or from its page: nothing is enqueued.
    response = changelist_action(operator_client, "retry_dead_letters", [row])
    assert any("Skipped 1 dead letter (1: already retried)" in m for m in messages_of(response))
    operator_client.post(f"/admin/djqueue/deadletter/{row.pk}/retry/")
    stub_worker.join(timeout=10_000)
    assert repairable["ran"] == [(42, True)]
    assert LogEntry.objects.count() == 1


def test_the_retried_message_is_fresh(stub_broker, repairable, operator_client):
    row = make_dead_letter(
        actor_name="shop.tasks.send_receipt",
        queue_name="mail",
        args=[7],
        kwargs={"copy": False},
        options={"retries": 20, "eta": 123, "priority": 3, "max_retries": 2},
    )
    operator_client.post(f"/admin/djqueue/deadletter/{row.pk}/retry/")
    row.refresh_from_db()
    consumer = stub_broker.consume("mail", timeout=100)
    proxy = next(consumer)
    assert proxy.message_id == row.retried_message_id != row.message_id
    assert (proxy.queue_name, proxy.actor_name, list(proxy.args), proxy.kwargs) == (
        "mail",
        "shop.tasks.send_receipt",
        [7],
        {"copy": False},
    )
    assert proxy.options == {"priority": 3, "max_retries": 2}
    consumer.close()


def test_retrying_several_rows_asks_for_confirmation_first(stub_broker, repairable, operator_client):
    rows = [make_dead_letter(actor_name="shop.tasks.send_receipt", args=[n]) for n in range(2)]
    gone = make_dead_letter(actor_name="shop.tasks.removed_long_ago")
    response = changelist_action(operator_client, "retry_dead_letters", [*rows, gone])
    assert response.templates[0].name == "admin/djqueue/deadletter/retry_confirmation.html"
    html = response.content.decode()
    assert "2 of the 3 selected dead letters will be sent again" in html
    assert "skipped: actor shop.tasks.removed_long_ago no longer exists" in html
    assert stub_broker.get_queue_stats("default").ready == 0
    assert DeadLetter.objects.filter(status="dead").count() == 3

    response = changelist_action(operator_client, "retry_dead_letters", [*rows, gone], post="yes")
    assert stub_broker.get_queue_stats("default").ready == 2
    assert set(DeadLetter.objects.filter(status="retried").values_list("pk", flat=True)) == {
        r.pk for r in rows
    }
    assert any("Retried 2 dead letters" in m for m in messages_of(response))
    assert any(
        "Skipped 1 dead letter (1: actor shop.tasks.removed_long_ago no longer exists)" in m
        for m in messages_of(response)
    )


def test_view_only_staff_and_anonymous_users_cannot_act(stub_broker, repairable, viewer_client):
    row = make_dead_letter(actor_name="shop.tasks.send_receipt")
    changelist = viewer_client.get("/admin/djqueue/deadletter/")
    assert changelist.status_code == 200 and row.message_id in changelist.content.decode()
    assert "retry_dead_letters" not in changelist.content.decode()
    page = viewer_client.get(f"/admin/djqueue/deadletter/{row.pk}/change/")
    assert page.status_code == 200 and "/retry/" not in page.content.decode()

    changelist_action(viewer_client, "retry_dead_letters", [row])
    changelist_action(viewer_client, "discard_dead_letters", [row])
    assert viewer_client.post(f"/admin/djqueue/deadletter/{row.pk}/retry/").status_code == 403
    assert viewer_client.post(f"/admin/djqueue/deadletter/{row.pk}/discard/").status_code == 403

    anonymous = Client()
    response = anonymous.post(f"/admin/djqueue/deadletter/{row.pk}/retry/")
    assert response.status_code == 302 and "/login/" in response["Location"]
    response = changelist_action(anonymous, "retry_dead_letters", [row])
    assert "/login/" in response.redirect_chain[-1][0]

    row.refresh_from_db()
    assert row.status == "dead"
    assert stub_broker.get_queue_stats("default").ready == 0
    assert not LogEntry.objects.exists()


def test_actions_need_a_csrf_token(stub_broker, repairable, django_user_model):
    row = make_dead_letter(actor_name="shop.tasks.send_receipt")
    user = django_user_model.objects.create_superuser("root", password=None)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(f"/admin/djqueue/deadletter/{row.pk}/retry/").status_code == 403
    response = client.post(
        "/admin/djqueue/deadletter/", {"action": "retry_dead_letters", "_selected_action": [row.pk]}
    )
    assert response.status_code == 403
    # GET never changes anything.
    assert client.get(f"/admin/djqueue/deadletter/{row.pk}/retry/").status_code == 405
    row.refresh_from_db()
    assert row.status == "dead"
    assert stub_broker.get_queue_stats("default").ready == 0


def test_discard(stub_broker, operator_client):
    dead, retried = make_dead_letter(), make_dead_letter(status="retried")
    response = changelist_action(operator_client, "discard_dead_letters", [dead, retried])
    assert any("Discarded 1 dead letter." in m for m in messages_of(response))
    assert any(
        "Skipped 1 dead letter that were already retried or discarded." in m for m in messages_of(response)
    )
    dead.refresh_from_db()
    retried.refresh_from_db()
    assert (dead.status, retried.status) == ("discarded", "retried")
    assert LogEntry.objects.get().object_id == str(dead.pk)
    # The button on the page does the same.
    other = make_dead_letter()
    operator_client.post(f"/admin/djqueue/deadletter/{other.pk}/discard/")
    other.refresh_from_db()
    assert other.status == "discarded"


def test_the_change_page_is_read_only(stub_broker, repairable, operator_client):
    row = make_dead_letter(actor_name="shop.tasks.send_receipt")
    page = operator_client.get(f"/admin/djqueue/deadletter/{row.pk}/change/")
    html = page.content.decode()
    assert 'name="_save"' not in html and "<textarea" not in html and '<input type="text"' not in html
    assert f"/admin/djqueue/deadletter/{row.pk}/retry/" in html
    assert (
        operator_client.post(f"/admin/djqueue/deadletter/{row.pk}/change/", {"status": "retried"}).status_code
        == 405
    )
    assert operator_client.get("/admin/djqueue/deadletter/add/").status_code == 403
    assert operator_client.post(f"/admin/djqueue/deadletter/{row.pk}/delete/").status_code == 403


def retry_at_once(queryset, threads: int = 4) -> list[int]:
    """Retry the rows of ``queryset`` from ``threads`` threads at the same moment; how many
    rows each retry enqueued."""
    barrier = threading.Barrier(threads)
    retried: list[int] = []

    def retry() -> None:
        barrier.wait()
        try:
            retried.append(len(retry_dead_letters(queryset.all()).retried))
        finally:
            connections.close_all()

    started = [threading.Thread(target=retry) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(20)
    return retried


@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_enqueue_once(stub_broker, repairable):
    row = make_dead_letter(actor_name="shop.tasks.send_receipt")
    assert sorted(retry_at_once(DeadLetter.objects.filter(pk=row.pk))) == [0, 0, 0, 1]
    assert stub_broker.get_queue_stats("default").ready == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_concurrent_retries_enqueue_once_on_postgresql(stub_broker, repairable):
    row = DeadLetter.objects.using("postgres").create(
        message_id="5f0c5e8e-1d7a-4c43-8f7e-3d7b8b2b9a10",
        queue_name="default",
        actor_name="shop.tasks.send_receipt",
    )
    assert sorted(retry_at_once(DeadLetter.objects.using("postgres").filter(pk=row.pk))) == [0, 0, 0, 1]
    assert stub_broker.get_queue_stats("default").ready == 1
    assert DeadLetter.objects.using("postgres").get().status == "retried"


def test_a_refused_message_leaves_its_row_dead(stub_broker, repairable, operator_client):
    # Another message holds the job's unique_key: the broker refuses the retry.
    holder = repairable["actor"].send_with_options(args=(1,), unique_key="receipt-1")
    assert holder is not None
    row = make_dead_letter(
        actor_name="shop.tasks.send_receipt", args=[1], options={"unique_key": "receipt-1"}
    )
    other = make_dead_letter(actor_name="shop.tasks.send_receipt", args=[2])
    response = changelist_action(operator_client, "retry_dead_letters", [row, other], post="yes")
    assert any("Retried 1 dead letter" in m for m in messages_of(response))
    assert any("not enqueued: unique_key 'receipt-1' is held by message" in m for m in messages_of(response))
    row.refresh_from_db()
    other.refresh_from_db()
    assert (row.status, row.retried_message_id, other.status) == ("dead", "", "retried")
    assert stub_broker.get_queue_stats("default").ready == 2  # the holder and the other retry

"""Scenario 7, security: JSON by default and a warning wherever pickle is chosen; broker
passwords never in logs, the start-up banner, the admin or exceptions; every admin
action refuses users without the permission and requests without a CSRF token; user
data escaped on every admin page. (``manage.py check --deploy`` for the example
project's production settings is tests/test_example_project.py.)"""

from __future__ import annotations

import json
import socket
import traceback
import uuid

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from djqueue.brokers import broker_from_url, get_broker, set_broker
from djqueue.encoder import get_encoder
from djqueue.errors import ConnectionError
from djqueue.models import DeadLetter, ScheduleRun, TaskResult
from tests.brokers.conftest import RABBITMQ_URL
from tests.process import run_django, wait_for
from tests.testapp.tasks import record

# Transactions of their own: worker processes write to the same SQLite file.
pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

SECRET = "s3cretpw"
SCRIPT = "<script>alert('x')</script>"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: nothing listens there


# -- encoding -----------------------------------------------------------------------------


def test_messages_are_json_by_default():
    assert get_encoder().name == "json"
    data = record.message_with_options(args=("x",)).encode()
    assert json.loads(data)["args"] == ["x"]


def test_pickle_warns_in_check_and_at_start_up(workers):
    check = run_django("check", settings="tests.reliability.pickle_settings")
    assert "djqueue.W001" in check.stderr + check.stdout
    queue = f"rel_{uuid.uuid4().hex[:8]}"
    env = {"DJANGO_SETTINGS_MODULE": "tests.reliability.pickle_settings"}
    w = workers("db://default", "--processes", "1", "--threads", "1", "--queues", queue, env=env)
    wait_for(lambda: "worker process 0 started" in w.output(), timeout=60, message="the worker")
    assert w.stop() == 0
    assert "djqueue is using the pickle encoder" in w.output()


# -- passwords ----------------------------------------------------------------------------


@pytest.mark.redis
def test_a_redis_password_never_shows_in_errors_logs_banner_or_admin(
    tmp_path, workers, client, django_user_model
):
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0"
    broker = broker_from_url(url, namespace=f"djqt{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectionError) as caught:
        broker.enqueue(record.message_with_options(args=(1,)))
    text = "".join(traceback.format_exception(caught.value))
    assert SECRET not in text and "127.0.0.1" in str(caught.value)
    assert SECRET not in broker.describe()

    # The admin's dashboard describes the broker and shows its errors.
    previous = get_broker()
    set_broker(broker)
    try:
        client.force_login(django_user_model.objects.create_superuser("root", password=None))
        page = client.get(reverse("djqueue_dashboard"))
        assert page.status_code == 200 and SECRET not in page.content.decode()
    finally:
        set_broker(previous)
        broker.close()

    # Workers that cannot reach the broker log why, without the password.
    queue = f"rel_{uuid.uuid4().hex[:8]}"
    w = workers(url, "--processes", "1", "--threads", "1", "--queues", queue)
    wait_for(lambda: "cannot reach Redis" in w.output(), timeout=60, message="a connection error in the log")
    assert w.stop() == 0
    assert SECRET not in w.output() and "redis://:***@127.0.0.1" in w.output()
    check = run_django("check", DJQUEUE_BROKER_URL=url)
    assert SECRET not in check.stdout + check.stderr


@pytest.mark.rabbitmq
def test_the_rabbitmq_password_is_masked_in_the_banner(workers):
    queue = f"rel_{uuid.uuid4().hex[:8]}"
    w = workers(RABBITMQ_URL, "--processes", "1", "--threads", "1", "--queues", queue)
    wait_for(lambda: "worker process 0 started" in w.output(), timeout=60, message="the worker")
    assert w.stop() == 0
    assert "amqp://guest:***@127.0.0.1" in w.output() and "guest:guest" not in w.output()
    broker = broker_from_url(RABBITMQ_URL)
    try:
        broker.delete_queue(queue)
    finally:
        broker.close()


# -- the admin ----------------------------------------------------------------------------


def staff(django_user_model, name: str, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(name, is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="djqueue", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


def dead_letter(**fields) -> DeadLetter:
    return DeadLetter.objects.create(
        message_id=str(uuid.uuid4()), queue_name="default", actor_name="record", args=["x"], kwargs={},
        options={}, exception_type="ValueError", exception_message="failed", **fields,
    )  # fmt: skip


def test_each_action_needs_its_own_permission(stub_broker, django_user_model):
    row = dead_letter()
    # May change (discard) but not retry; may retry but not change (discard).
    changer = staff(django_user_model, "changer", "view_deadletter", "change_deadletter")
    retrier = staff(django_user_model, "retrier", "view_deadletter", "retry_deadletter")
    assert changer.post(f"/admin/djqueue/deadletter/{row.pk}/retry/").status_code == 403
    assert retrier.post(f"/admin/djqueue/deadletter/{row.pk}/discard/").status_code == 403
    for client, action in ((changer, "retry_dead_letters"), (retrier, "discard_dead_letters")):
        client.post(
            "/admin/djqueue/deadletter/", {"action": action, "_selected_action": [row.pk], "index": "0"}
        )
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DEAD
    assert stub_broker.get_queue_stats("default").ready == 0


def test_discarding_needs_a_csrf_token(stub_broker, django_user_model):
    row = dead_letter()
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_superuser("root", password=None))
    assert client.post(f"/admin/djqueue/deadletter/{row.pk}/discard/").status_code == 403
    response = client.post(
        "/admin/djqueue/deadletter/", {"action": "discard_dead_letters", "_selected_action": [row.pk]}
    )
    assert response.status_code == 403
    assert client.get(f"/admin/djqueue/deadletter/{row.pk}/discard/").status_code == 405
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DEAD


def test_user_data_is_escaped_on_the_results_and_schedule_pages(stub_broker, django_user_model):
    result = TaskResult.objects.create(
        message_id=str(uuid.uuid4()), actor_name=SCRIPT, queue_name="default", status="failed",
        result={"html": SCRIPT}, exception_type="<img src=x onerror=alert(1)>", exception=SCRIPT,
    )  # fmt: skip
    run = ScheduleRun.objects.create(name=SCRIPT, fire_time="2030-01-01T00:00:00Z", message_id=SCRIPT[:60])
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", password=None))
    pages = [
        "/admin/djqueue/taskresult/",
        f"/admin/djqueue/taskresult/{result.pk}/change/",
        "/admin/djqueue/schedulerun/",
        f"/admin/djqueue/schedulerun/{run.pk}/change/",
    ]
    for url in pages:
        response = client.get(url)
        html = response.content.decode()
        assert response.status_code == 200, url
        assert "<script>alert" not in html and "<img src=x" not in html, url
        assert "&lt;script&gt;" in html, url

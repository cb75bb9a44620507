"""manage.py queuestats on the stub, database and Redis brokers."""

from __future__ import annotations

import io
import json
import os
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from djqueue.brokers import broker_from_url, get_broker, set_broker
from djqueue.models import DeadLetter
from tests.testapp.tasks import record

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("DJQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKERS = [
    pytest.param(("stub://", {}), id="stub"),
    pytest.param(("db://default", {}), id="sqlite"),
    pytest.param(
        (REDIS_URL, {"namespace": f"qs{uuid.uuid4().hex[:8]}"}), id="redis", marks=pytest.mark.redis
    ),
]


@pytest.fixture(params=BROKERS)
def broker(request):
    url, options = request.param
    broker = broker_from_url(url, **options)
    previous = get_broker()
    set_broker(broker)
    yield broker
    set_broker(previous)
    broker.close()
    for connection in connections.all():
        connection.close()


@pytest.fixture
def queue(broker) -> str:
    name = f"qs_{uuid.uuid4().hex[:8]}"
    for n in range(3):
        broker.enqueue(record.message_with_options(args=(n,), queue_name=name))
    broker.enqueue(record.message_with_options(args=(9,), queue_name=name), delay=600_000)
    DeadLetter.objects.create(message_id=str(uuid.uuid4()), queue_name=name, actor_name="record")
    yield name
    broker.purge(name)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("queuestats", *args, stdout=out)
    return out.getvalue()


def test_table(broker, queue):
    lines = run("--queues", queue).splitlines()
    assert lines[0].split() == [
        "queue",
        "ready",
        "delayed",
        "in",
        "flight",
        "dead",
        "(broker)",
        "dead",
        "letters",
    ]
    assert set(lines[1]) == {"-", " "}
    # The database broker's dead-letter store is the DeadLetter table itself.
    dead = "1" if broker.scheme == "db" else "0"
    assert lines[2].split() == [queue, "3", "1", "0", dead, "1"]


def test_json(broker, queue):
    data = json.loads(run("--json", "--queues", queue))
    dead = 1 if broker.scheme == "db" else 0
    assert data == {
        "queues": [
            {
                "queue_name": queue,
                "ready": 3,
                "delayed": 1,
                "in_flight": 0,
                "dead": dead,
                "dead_letters": 1,
                "error": "",
            }
        ]
    }


def test_default_queues_include_those_with_dead_letters(broker, queue):
    DeadLetter.objects.create(message_id=str(uuid.uuid4()), queue_name="only_dead_here", actor_name="gone")
    names = [row["queue_name"] for row in json.loads(run("--json"))["queues"]]
    assert queue in names and "only_dead_here" in names


def test_an_unreachable_broker_is_an_error():
    broken = broker_from_url("redis://127.0.0.1:1/0")
    previous = get_broker()
    set_broker(broken)
    try:
        with pytest.raises(CommandError, match="the broker did not answer for queue q1"):
            run("--queues", "q1")
    finally:
        set_broker(previous)
        broken.close()

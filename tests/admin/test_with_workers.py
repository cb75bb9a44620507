"""End to end with real worker processes (``runworkers``) on the database and Redis
brokers: a job that fails becomes a row, an operator retries it from the admin and it
runs; groups and pipelines return their values and fire their callback."""

from __future__ import annotations

import uuid

import pytest
from django.db import connections

from djqueue.brokers import broker_from_url, get_broker, set_broker
from djqueue.composition import group
from djqueue.models import DeadLetter
from tests.process import read_records, start_workers, wait_for
from tests.results.conftest import REDIS_URL, delete_namespace
from tests.testapp.tasks import record

from .conftest import changelist_action

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

BROKERS = [
    pytest.param("db://default", id="db"),
    pytest.param(REDIS_URL, id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=BROKERS)
def broker_url(request):
    return request.param


@pytest.fixture
def broker_options(broker_url):
    return {"namespace": f"djqa{uuid.uuid4().hex[:8]}"} if broker_url.startswith("redis") else {}


@pytest.fixture
def broker(broker_url, broker_options):
    """The broker the worker processes use, as this process's current broker, knowing
    the test actors (the admin checks that a dead letter's actor exists)."""
    previous = get_broker()
    instance = broker_from_url(broker_url, **broker_options)
    for test_actor in previous.actors.values():
        instance.declare_actor(test_actor)
    set_broker(instance)
    yield instance
    set_broker(previous)
    instance.close()
    if "namespace" in broker_options:
        delete_namespace(broker_options["namespace"])
    for connection in connections.all():
        connection.close()


@pytest.fixture
def workers(tmp_path, broker_url, broker_options, broker, record_dir):
    queue = f"qa_{uuid.uuid4().hex[:10]}"  # record_dir first: the processes inherit its variable
    process = start_workers(
        tmp_path,
        broker_url,
        "--processes",
        "1",
        "--threads",
        "2",
        "--queues",
        queue,
        broker_options=broker_options,
    )
    yield queue
    try:
        assert process.stop() == 0, process.output()
    finally:
        if process.process.poll() is None:
            process.process.kill()


def ran(record_dir, message_id: str) -> bool:
    return any(seen == message_id for seen, _, _ in read_records(record_dir))


def test_a_dead_letter_retried_by_an_operator_runs(broker, workers, record_dir, operator_client):
    # Due in 1.5 s but only allowed to wait 0.5 s: a real worker dead-letters it (max_age),
    # as a job that sat too long in a backed-up queue.
    late = broker.enqueue(
        record.message_with_options(args=("late",), queue_name=workers, max_age=500), delay=1500
    )
    row = wait_for(
        lambda: DeadLetter.objects.filter(message_id=late.message_id).first(), message="the dead letter row"
    )
    assert row.actor_name == "record" and "max_age" in row.exception_message
    assert not ran(record_dir, late.message_id)

    changelist_action(operator_client, "retry_dead_letters", [row])
    row.refresh_from_db()
    assert row.status == "retried"
    # The new message is fresh (no eta, a new timestamp), so it is young enough to run.
    wait_for(lambda: ran(record_dir, row.retried_message_id), message="the retried job")

    changelist_action(operator_client, "retry_dead_letters", [row])
    broker.join(workers, timeout=10_000)
    assert [seen for seen, _, _ in read_records(record_dir)] == [row.retried_message_id]


def test_groups_and_pipelines_on_real_workers(broker, workers, record_dir):
    def on(queue: str, *args: object, **options: object):
        return record.message_with_options(args=args, queue_name=queue, **options)

    callback = on(workers, "all done")
    g = group(
        [
            on(workers, 1),
            on(workers, {"two": 2}),
            on(workers, 3) | on(workers),
            on(workers, "x") | on(workers),
        ]
    )
    g.add_completion_callback(callback)
    g.run()
    assert g.get_results(block=True, timeout=30_000) == [1, {"two": 2}, 3, "x"]
    wait_for(lambda: ran(record_dir, callback.message_id), message="the completion callback")
    broker.join(workers, timeout=10_000)
    assert [value for seen, _, value in read_records(record_dir) if seen == callback.message_id] == [
        "all done"
    ]

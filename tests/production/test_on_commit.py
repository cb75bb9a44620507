"""DJQUEUE["ENQUEUE_ON_COMMIT"]: .send() inside a transaction enqueues when it commits, so
a job is never picked up before the row it refers to exists, and never on rollback."""

from __future__ import annotations

import time
import uuid

import pytest
from django.conf import settings
from django.db import connections, transaction
from django.test import override_settings

from djqueue import Worker, actor
from djqueue.brokers import broker_from_url
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])

BROKERS = [
    pytest.param("stub://", id="stub"),
    pytest.param("db://default", id="sqlite"),
    pytest.param("db://postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BROKERS)
def broker(request):
    broker = broker_from_url(request.param)
    yield broker
    broker.close()
    for connection in connections.all():
        connection.close()


@pytest.fixture
def on_commit():
    with override_settings(DJQUEUE={**settings.DJQUEUE, "ENQUEUE_ON_COMMIT": True}):
        yield


@pytest.fixture
def queue() -> str:
    return f"oc_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def job(broker, queue):
    seen: list[tuple[int, bool]] = []

    @actor(broker=broker, actor_name=f"ship_{queue}", queue_name=queue)
    def ship(pk: int) -> None:
        # The row the job refers to must be there when the job runs.
        seen.append((pk, Execution.objects.filter(pk=pk).exists()))

    ship.seen = seen
    return ship


def run_worker(broker, queue):
    worker = Worker(broker, queues=[queue], worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=20_000)
    finally:
        worker.stop(timeout=5_000)


def test_a_job_sent_in_a_transaction_is_enqueued_on_commit(broker, queue, job, on_commit):
    with transaction.atomic():
        row = Execution.objects.create(actor_name="order")
        message = job.send(row.pk)
        assert message is not None and message.args == (row.pk,)
        assert broker.get_queue_stats(queue).ready == 0, "visible before commit"
    assert broker.get_queue_stats(queue).ready == 1
    run_worker(broker, queue)
    assert job.seen == [(row.pk, True)]


def test_a_job_sent_in_a_rolled_back_transaction_is_dropped(broker, queue, job, on_commit):
    with pytest.raises(RuntimeError), transaction.atomic():
        row = Execution.objects.create(actor_name="order")
        job.send_with_options(args=(row.pk,), delay=10)
        raise RuntimeError("roll back")
    assert broker.get_queue_stats(queue)[:2] == (0, 0)
    assert not Execution.objects.exists()


def test_the_message_id_returned_at_call_time_is_the_one_enqueued(broker, queue, on_commit):
    @actor(broker=broker, actor_name=f"noop_{queue}", queue_name=queue)
    def noop() -> None: ...

    with transaction.atomic():
        before = int(time.time() * 1000)
        message = noop.send_with_options(delay=60_000)
        assert message.eta >= before + 60_000, "the delay counts from the call"
    consumer_stats = broker.get_queue_stats(queue)
    assert consumer_stats.delayed == 1
    assert broker.cancel(message.message_id), "the id given at call time is the queued one"


def test_outside_a_transaction_the_job_is_enqueued_at_once(broker, queue, job, on_commit):
    job.send(1)
    assert broker.get_queue_stats(queue).ready == 1


def test_without_the_setting_send_does_not_wait_for_commit(queue):
    broker = broker_from_url("stub://")

    @actor(broker=broker, actor_name=f"noop_{queue}", queue_name=queue)
    def noop() -> None: ...

    with transaction.atomic():
        noop.send()
        assert broker.get_queue_stats(queue).ready == 1

"""Cancelling: djqueue.cancel(message_id) and message.cancel() remove a queued or delayed
message before it starts, on every broker that supports it."""

from __future__ import annotations

import uuid

import pytest

from djqueue import Worker, actor
from djqueue.brokers import cancel, get_broker, set_broker

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


@pytest.fixture
def broker(case):
    broker = case.make()
    previous = get_broker()
    set_broker(broker)
    yield broker
    set_broker(previous)


def run_all(broker, queue):
    worker = Worker(broker, queues=[queue], worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=20_000)
    finally:
        worker.stop(timeout=5_000)


def test_cancelled_messages_never_run(broker, queue):
    if not broker.supports_cancel:
        check_cancel_is_refused(broker, queue)
        return
    ran: list[str] = []

    @actor(broker=broker, actor_name=f"c_job_{queue}", queue_name=queue)
    def job(name: str) -> None:
        ran.append(name)

    ready = job.send("ready")
    delayed = job.send_with_options(args=("delayed",), delay=60_000)
    kept = job.send("kept")
    later = job.send_with_options(args=("later",), delay=60_000)

    assert cancel(ready.message_id) is True
    assert delayed.cancel() is True
    assert cancel(ready.message_id) is False, "found only once"
    assert cancel(str(uuid.uuid4())) is False, "an unknown id is not found"
    assert cancel(later.message_id, queue_name=queue) is True
    stats = broker.get_queue_stats(queue)
    assert (stats.ready, stats.delayed) == (1, 0)

    run_all(broker, queue)
    assert ran == ["kept"]
    assert cancel(kept.message_id) is False, "a message that already ran is not found"


def check_cancel_is_refused(broker, queue):
    """A broker that cannot cancel (RabbitMQ) finds nothing, and the message still runs."""
    ran: list[str] = []

    @actor(broker=broker, actor_name=f"c_job_{queue}", queue_name=queue)
    def job(name: str) -> None:
        ran.append(name)

    message = job.send("kept")
    assert cancel(message.message_id) is False
    assert message.cancel() is False
    run_all(broker, queue)
    assert ran == ["kept"]

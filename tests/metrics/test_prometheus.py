"""The Prometheus middleware in one process, on the stub broker: what each metric counts."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from djqueue import Worker, actor
from djqueue.errors import SkipMessage
from djqueue.middleware import Middleware
from djqueue.middleware.prometheus import Prometheus

pytestmark = pytest.mark.django_db(transaction=True)


def value(name: str, queue: str, actor_name: str) -> float:
    return REGISTRY.get_sample_value(name, {"queue_name": queue, "actor_name": actor_name}) or 0.0


@pytest.fixture
def queue() -> str:
    return f"m_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def worker(stub_broker):
    Prometheus.install(stub_broker)
    worker = Worker(stub_broker, worker_threads=2, worker_timeout=100)
    yield worker
    worker.stop(timeout=5_000)


def test_installed_first_and_once(stub_broker):
    first = Prometheus.install(stub_broker)
    assert Prometheus.install(stub_broker) is first
    assert stub_broker.middleware[0] is first
    assert sum(isinstance(m, Prometheus) for m in stub_broker.middleware) == 1


def test_counts_successes_errors_retries_and_dead_letters(stub_broker, worker, queue):
    @actor(broker=stub_broker, actor_name=f"ok_{queue}", queue_name=queue)
    def ok(n: int) -> int:
        return n

    @actor(broker=stub_broker, actor_name=f"bad_{queue}", queue_name=queue, max_retries=2, min_backoff=1)
    def bad() -> None:
        raise ValueError("always")

    for n in range(10):
        ok.send(n)
    bad.send()
    stub_broker.enqueue_raw(queue, b"not a message")
    worker.start()
    worker.join(timeout=10_000)

    assert value("djqueue_messages_total", queue, ok.actor_name) == 10
    assert value("djqueue_message_errors_total", queue, ok.actor_name) == 0
    assert value("djqueue_message_duration_seconds_count", queue, ok.actor_name) == 10
    # 3 runs: the first and 2 retries; the third failure is dead-lettered, not retried.
    assert value("djqueue_messages_total", queue, bad.actor_name) == 3
    assert value("djqueue_message_errors_total", queue, bad.actor_name) == 3
    assert value("djqueue_message_retries_total", queue, bad.actor_name) == 2
    assert value("djqueue_dead_letters_total", queue, bad.actor_name) == 1
    # Undecodable bytes never reach an actor but are dead letters all the same.
    assert value("djqueue_dead_letters_total", queue, "") == 1
    assert value("djqueue_messages_inprogress", queue, ok.actor_name) == 0
    assert value("djqueue_messages_inprogress", queue, bad.actor_name) == 0


def test_skipped_messages_leave_no_message_in_progress(stub_broker, queue):
    class SkipAll(Middleware):
        def before_process_message(self, broker, message):
            raise SkipMessage("skipped")

    stub_broker.add_middleware(SkipAll())
    Prometheus.install(stub_broker)

    @actor(broker=stub_broker, actor_name=f"skipped_{queue}", queue_name=queue)
    def skipped() -> None:
        raise AssertionError("never runs")

    skipped.send()
    worker = Worker(stub_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=10_000)
    finally:
        worker.stop(timeout=5_000)
    assert value("djqueue_messages_total", queue, skipped.actor_name) == 1
    assert value("djqueue_messages_inprogress", queue, skipped.actor_name) == 0
    assert value("djqueue_message_errors_total", queue, skipped.actor_name) == 0

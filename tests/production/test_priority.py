"""Priorities end to end: with messages waiting, a real worker runs the higher priority
first, on every broker that supports priorities."""

from __future__ import annotations

import pytest

from djqueue import Worker, actor

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


def test_a_worker_runs_higher_priorities_first(case, queue):
    broker = case.make()
    if not broker.supports_priority:
        pytest.skip(f"the {case.name} broker does not support priorities")
    order: list[str] = []

    @actor(broker=broker, actor_name=f"p_job_{queue}", queue_name=queue)
    def job(name: str) -> None:
        order.append(name)

    @actor(broker=broker, actor_name=f"p_urgent_{queue}", queue_name=queue, priority=4)
    def urgent(name: str) -> None:
        order.append(name)

    # Sent lowest-first, so that running in arrival order would fail; within 0 to 5, the
    # range every broker orders by default (RabbitMQ's max_priority).
    job.send("p0")
    job.send_with_options(args=("p1",), priority=1)
    urgent.send("p4-actor-default")
    job.send_with_options(args=("p3",), priority=3)
    urgent.send_with_options(args=("p2-overrides-actor",), priority=2)
    job.send_with_options(args=("p5",), priority=5)
    job.send_with_options(args=("p-5",), priority=-5)

    # One thread, one message in hand at a time: the order of fetching is the order of running.
    worker = Worker(broker, queues=[queue], worker_threads=1, prefetch=1, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=30_000)
    finally:
        worker.stop(timeout=5_000)
    assert order == ["p5", "p4-actor-default", "p3", "p2-overrides-actor", "p1", "p0", "p-5"]

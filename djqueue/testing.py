"""Helpers for testing code that sends djqueue jobs.

from djqueue.testing import stub_broker, drain

def test_checkout_sends_a_receipt(client):
    with stub_broker() as broker:
        client.post("/checkout/", {...})
        assert broker.get_queue_stats("default").ready == 1
        drain(broker)              # run every queued job (and its retries) here, in threads
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .brokers import get_broker, set_broker
from .brokers.base import Broker
from .brokers.stub import StubBroker
from .worker import Worker


@contextmanager
def stub_broker() -> Iterator[StubBroker]:
    """Make an in-memory broker current, with every known actor moved onto it.

    Actors are usually declared at import time on the broker from settings; inside
    this block they send to (and are run from) the stub broker instead.
    """
    previous = get_broker()
    broker = StubBroker(middleware=[type(m)() for m in previous.middleware])
    moved = list(previous.actors.values())
    for actor in moved:
        actor.broker = broker
        broker.declare_actor(actor)
    set_broker(broker)
    try:
        yield broker
    finally:
        for actor in moved:
            actor.broker = previous
        set_broker(previous)
        broker.close()


@contextmanager
def running_worker(
    broker: Broker | None = None, *, threads: int = 2, queues: list[str] | None = None
) -> Iterator[Worker]:
    """A worker running in this process for the duration of the block."""
    worker = Worker(broker or get_broker(), queues=queues, worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)


def drain(
    broker: Broker | None = None, *, timeout: int = 30_000, threads: int = 2, run_delayed: bool = True
) -> None:
    """Run queued jobs (and the retries they cause) until every queue is empty.

    On the stub broker, unless ``run_delayed=False``, time skips ahead to the next
    delayed message (``delay=``, ``eta=``, a retry's backoff) whenever no other job is
    due or running, rather than waiting out the real delay; other brokers always wait.
    ``timeout`` is in ms; raises TimeoutError if the queues are not empty by then.
    """
    broker = broker or get_broker()
    stub = broker if isinstance(broker, StubBroker) and run_delayed else None
    if stub is not None:
        stub.run_delayed = True
    try:
        with running_worker(broker, threads=threads) as worker:
            worker.join(timeout=timeout)
    finally:
        if stub is not None:
            stub.run_delayed = False

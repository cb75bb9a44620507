"""async def actors: they run on the worker process's event loop thread, as many at once as
there are worker threads; time limits and shutdown notifications cancel them."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation

from djqueue import Middleware, Worker, actor
from djqueue.brokers.database import DatabaseBroker
from djqueue.models import DeadLetter
from tests.process import wait_for
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


class CaptureResults(Middleware):
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def after_process_message(self, broker, message, *, result=None, exception=None) -> None:
        self.results[message.message_id] = exception if exception is not None else result


@pytest.fixture
def captured(stub_broker):
    capture = CaptureResults()
    stub_broker.add_middleware(capture)
    return capture


def test_an_async_actor_runs_and_returns(stub_broker, stub_worker, captured):
    threads: list[str] = []

    @actor(broker=stub_broker, actor_name="async_add")
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        threads.append(threading.current_thread().name)
        return a + b

    assert add.is_async
    message = add.send(2, 3)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert captured.results[message.message_id] == 5
    assert threads == ["djqueue-event-loop"]
    assert add(4, 5) == 9, "called directly, it runs to completion too"


def test_an_async_actor_can_use_the_async_orm(stub_broker, stub_worker, captured):
    @actor(broker=stub_broker, actor_name="async_orm")
    async def create(value: str) -> int:
        row = await Execution.objects.acreate(actor_name="async_orm", value=value)
        return await Execution.objects.filter(pk=row.pk).acount()

    message = create.send("x")
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert captured.results[message.message_id] == 1
    assert Execution.objects.get().value == "x"


def test_an_async_actor_past_its_time_limit_is_cancelled_and_dead_lettered(stub_broker, stub_worker):
    seen: list[str] = []

    @actor(broker=stub_broker, actor_name="async_slow", time_limit=200, max_retries=1, min_backoff=10)
    async def slow() -> None:
        seen.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("finished")

    message = slow.send()
    stub_worker.start()
    stub_worker.join(timeout=15_000)
    wait_for(lambda: seen.count("cancelled") == 2, timeout=5, message="both attempts cancelled")
    assert seen == ["started", "cancelled"] * 2, "retried once, then given up"
    row = DeadLetter.objects.get(message_id=message.message_id)
    assert row.exception_type == "TimeLimitExceeded"
    assert row.retries == 1


def test_many_async_actors_run_at_once_across_worker_threads(stub_broker):
    threads, messages = 8, 24
    barrier = asyncio.Barrier(threads)
    lock = threading.Lock()
    running = {"now": 0, "max": 0, "done": 0}

    @actor(broker=stub_broker, actor_name="async_together")
    async def together() -> None:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        try:
            # Passes only when `threads` coroutines wait here at the same time.
            await asyncio.wait_for(barrier.wait(), timeout=10)
        finally:
            with lock:
                running["now"] -= 1
                running["done"] += 1

    for _ in range(messages):
        together.send()
    worker = Worker(stub_broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=30_000)
    finally:
        worker.stop(timeout=5_000)
    assert running["done"] == messages
    assert running["max"] == threads, "as many at once as worker threads, and no more"
    assert not DeadLetter.objects.exists()


def test_shutdown_cancels_an_async_actor_that_asks_for_it(stub_broker):
    seen: list[str] = []

    @actor(broker=stub_broker, actor_name="async_long", notify_shutdown=True)
    async def long() -> None:
        seen.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    long.send()
    worker = Worker(stub_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    wait_for(lambda: seen == ["started"], timeout=10, message="the actor to start")
    worker.stop(timeout=5_000)
    wait_for(lambda: "cancelled" in seen, timeout=5, message="the coroutine to be cancelled")
    stats = stub_broker.get_queue_stats("default")
    assert (stats.ready, stats.in_flight) == (1, 0), "given back to the queue for the next worker"
    assert not DeadLetter.objects.exists()


def test_a_concurrent_limiter_holds_across_awaits(stub_broker, memory_backend):
    from djqueue.rate_limits import ConcurrentRateLimiter

    limiter = ConcurrentRateLimiter("async-limit", 1, ttl=10_000)
    lock = threading.Lock()
    running = {"now": 0, "max": 0, "done": 0}

    @actor(broker=stub_broker, actor_name="async_limited", max_retries=1000, min_backoff=5, max_backoff=20)
    async def limited() -> None:
        with limiter.acquire():
            with lock:
                running["now"] += 1
                running["max"] = max(running["max"], running["now"])
            await asyncio.sleep(0.02)
            with lock:
                running["now"] -= 1
                running["done"] += 1

    for _ in range(6):
        limited.send()
    worker = Worker(stub_broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=30_000)
    finally:
        worker.stop(timeout=5_000)
    assert running == {"now": 0, "max": 1, "done": 6}


def test_an_async_actor_sends_on_the_database_broker_through_sync_to_async():
    # The database broker's send() is an INSERT through the Django ORM, which Django
    # refuses inside an event loop; docs/production.md gives sync_to_async for it.
    broker = DatabaseBroker.from_url("db://default")
    queue = f"async_{uuid.uuid4().hex[:8]}"
    direct: list[BaseException] = []

    @actor(broker=broker, actor_name="async_follow_up", queue_name=queue)
    def follow_up(value: str) -> None:
        Execution.objects.create(actor_name="async_follow_up", value=value)

    @actor(broker=broker, actor_name="async_sender", queue_name=queue, max_retries=0)
    async def sender(value: str) -> None:
        try:
            follow_up.send(value)
        except SynchronousOnlyOperation as e:
            direct.append(e)
        await sync_to_async(follow_up.send)(value)

    sender.send("sent from a coroutine")
    worker = Worker(broker, queues=[queue], worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=30_000)
    finally:
        worker.stop(timeout=5_000)
        broker.close()
    assert [row.value for row in Execution.objects.all()] == ["sent from a coroutine"]
    assert len(direct) == 1, "a plain send() from the event loop is refused, not half done"
    assert not DeadLetter.objects.exists()

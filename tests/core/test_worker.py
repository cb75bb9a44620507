from __future__ import annotations

import threading
import time

import pytest

from djqueue import Retry, TimeLimitExceeded, actor
from djqueue.middleware.retries import compute_backoff
from djqueue.models import DeadLetter

pytestmark = pytest.mark.django_db(transaction=True)


def test_messages_are_processed_and_acked(stub_broker, stub_worker):
    seen = []

    @actor(broker=stub_broker, actor_name="collect")
    def collect(n: int) -> None:
        seen.append(n)

    for n in range(200):
        collect.send(n)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert sorted(seen) == list(range(200))
    assert stub_broker.get_queue_stats("default") == (0, 0, 0, 0)


def test_retries_reach_success(stub_broker, stub_worker):
    attempts = []

    @actor(broker=stub_broker, actor_name="flaky", max_retries=5, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    flaky.send()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert len(attempts) == 3
    assert not DeadLetter.objects.exists()


def test_exhausted_retries_are_dead_lettered(stub_broker, stub_worker):
    @actor(broker=stub_broker, actor_name="hopeless", max_retries=2, min_backoff=10, max_backoff=20)
    def hopeless(x: int) -> None:
        raise ValueError(f"bad value {x}")

    message = hopeless.send(7)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    row = DeadLetter.objects.get(message_id=message.message_id)
    assert row.exception_type == "ValueError"
    assert "bad value 7" in row.exception_message
    assert "gave up after 2 retries" in row.exception_message
    assert row.retries == 2
    assert row.args == [7] and row.actor_name == "hopeless" and row.queue_name == "default"
    assert "Traceback" in row.traceback
    assert row.status == DeadLetter.Status.DEAD
    assert row.message["message_id"] == message.message_id
    assert len(stub_broker.dead_letters("default")) == 1


@pytest.mark.parametrize("throws", [KeyError, (KeyError,), [KeyError]], ids=["class", "tuple", "list"])
def test_throws_dead_letters_without_retrying(stub_broker, stub_worker, throws):
    calls = []

    @actor(broker=stub_broker, actor_name="thrower", throws=throws)
    def thrower() -> None:
        calls.append(1)
        raise KeyError("missing")

    message = thrower.send()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert len(calls) == 1
    assert DeadLetter.objects.get(message_id=message.message_id).exception_type == "KeyError"


def test_an_exception_outside_a_throws_list_is_retried(stub_broker, stub_worker):
    calls = []

    @actor(broker=stub_broker, actor_name="flaky_thrower", throws=[KeyError], min_backoff=10, max_backoff=20)
    def flaky_thrower() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first time only")

    flaky_thrower.send()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert len(calls) == 2
    assert not DeadLetter.objects.exists()


def test_retry_exception_sets_the_delay(stub_broker, stub_worker):
    times = []

    @actor(broker=stub_broker, actor_name="later", max_retries=1)
    def later() -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise Retry(delay=300)

    later.send()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert len(times) == 2
    assert times[1] - times[0] >= 0.29


def test_bad_input_is_dead_lettered_and_good_messages_keep_flowing(stub_broker, stub_worker):
    seen = []

    @actor(broker=stub_broker, actor_name="good")
    def good(n: int) -> None:
        seen.append(n)

    from djqueue import Message

    stub_broker.enqueue_raw("default", b"{not json")
    stub_broker.enqueue_raw("default", b'{"queue_name": "default"}')
    unknown = Message(queue_name="default", actor_name="no.such.actor", args=(), kwargs={}, options={})
    stub_broker.enqueue(unknown)
    wrong_args = good.send_with_options(args=(1, 2, 3))
    for n in range(20):
        good.send(n)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert sorted(seen) == list(range(20))
    rows = {row.exception_type: row for row in DeadLetter.objects.all()}
    assert set(rows) == {"DecodeError", "UnknownActor", "ArgumentsMismatch"}
    assert rows["DecodeError"].raw_payload in ("{not json", '{"queue_name": "default"}')
    assert DeadLetter.objects.filter(exception_type="DecodeError").count() == 2
    assert "no.such.actor" in rows["UnknownActor"].exception_message
    assert rows["ArgumentsMismatch"].message_id == wrong_args.message_id
    assert "arguments do not match" in rows["ArgumentsMismatch"].exception_message
    assert all(thread.is_alive() for thread in stub_worker.workers)


def test_time_limit_interrupts_a_running_actor(stub_broker, stub_worker):
    outcome = []

    @actor(broker=stub_broker, actor_name="forever", time_limit=200, max_retries=0)
    def forever() -> None:
        try:
            while True:
                time.sleep(0.01)
        except TimeLimitExceeded:
            outcome.append("interrupted")
            raise

    message = forever.send()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert outcome == ["interrupted"]
    assert DeadLetter.objects.get(message_id=message.message_id).exception_type == "TimeLimitExceeded"


def test_a_time_limit_never_interrupts_what_runs_after_the_actor(stub_broker, stub_worker):
    # A deadline that falls once the actor has returned must not land in the middleware
    # that runs after it (a result stored, a pipeline's next step enqueued) nor in the
    # worker's own settling of the message.
    from djqueue import Middleware

    finished = []

    class SlowAfterHook(Middleware):
        def after_process_message(self, broker, message, *, result=None, exception=None):
            until = time.monotonic() + 0.3  # past the 100 ms limit, in Python code
            while time.monotonic() < until:
                pass
            finished.append(message.message_id)

    stub_broker.add_middleware(SlowAfterHook())

    @actor(broker=stub_broker, actor_name="quick", time_limit=100, max_retries=0)
    def quick() -> None:
        pass

    sent = [quick.send() for _ in range(3)]
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert sorted(finished) == sorted(m.message_id for m in sent)
    assert not DeadLetter.objects.exists()


def test_age_limit_dead_letters_old_messages(stub_broker, stub_worker):
    ran = []

    @actor(broker=stub_broker, actor_name="fresh_only", max_age=1_000)
    def fresh_only() -> None:
        ran.append(1)

    message = fresh_only.message()
    message.message_timestamp -= 5_000
    stub_broker.enqueue(message)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert ran == []
    assert "max_age" in DeadLetter.objects.get(message_id=message.message_id).exception_message


def test_a_failing_after_hook_is_logged_not_fatal(stub_broker, stub_worker, caplog):
    from djqueue import Middleware

    class Broken(Middleware):
        def after_process_message(self, broker, message, *, result=None, exception=None):
            raise RuntimeError("hook bug")

    stub_broker.add_middleware(Broken())
    seen = []

    @actor(broker=stub_broker, actor_name="still_runs")
    def still_runs(n: int) -> None:
        seen.append(n)

    for n in range(5):
        still_runs.send(n)
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert sorted(seen) == list(range(5))
    assert "hook bug" in caplog.text


def test_graceful_stop_gives_back_unstarted_messages(stub_broker):
    from djqueue import Worker

    started = threading.Event()
    release = threading.Event()

    @actor(broker=stub_broker, actor_name="blocker")
    def blocker() -> None:
        started.set()
        release.wait(5)

    for _ in range(10):
        blocker.send()
    worker = Worker(stub_broker, worker_threads=1, worker_timeout=100)
    worker.start()
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    worker.stop(timeout=5_000)
    # One ran to completion; the prefetched rest are back in the queue, none in flight.
    assert stub_broker.get_queue_stats("default") == (9, 0, 0, 0)


def test_backoff_doubles_within_bounds():
    assert compute_backoff(0, min_backoff=100, max_backoff=10_000, jitter=False) == 100
    assert compute_backoff(3, min_backoff=100, max_backoff=10_000, jitter=False) == 800
    assert compute_backoff(30, min_backoff=100, max_backoff=10_000, jitter=False) == 10_000
    for retries in range(10):
        value = compute_backoff(retries, min_backoff=100, max_backoff=10_000)
        full = min(100 * 2**retries, 10_000)
        assert full // 2 <= value <= full


def test_a_message_whose_worker_keeps_dying_is_dead_lettered(stub_broker, stub_worker):
    ran = []

    @actor(broker=stub_broker, actor_name="crasher", max_deliveries=3)
    def crasher() -> None:
        ran.append(1)

    message = crasher.send()
    # Three deliveries whose consumer vanished without acking, as a killed process would.
    for delivery in range(1, 4):
        consumer = stub_broker.consume("default", prefetch=1, timeout=1000)
        assert next(consumer).delivery_count == delivery
        consumer.close()
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert ran == []
    row = DeadLetter.objects.get(message_id=message.message_id)
    assert "delivered 4 times without finishing" in row.exception_message


def test_a_message_option_max_deliveries_wins_over_the_actors(stub_broker, stub_worker):
    @actor(broker=stub_broker, actor_name="crasher", max_deliveries=5)
    def crasher() -> None:
        pass

    message = crasher.send_with_options(max_deliveries=1)
    consumer = stub_broker.consume("default", prefetch=1, timeout=1000)
    assert next(consumer).delivery_count == 1
    consumer.close()  # as a killed process would
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    row = DeadLetter.objects.get(message_id=message.message_id)
    assert "more than max_deliveries=1" in row.exception_message

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid

import pytest

from djqueue import Retry, TimeLimitExceeded, actor
from djqueue.middleware.retries import compute_backoff
from djqueue.models import DeadLetter
from tests.process import wait_for
from tests.redis_server import RedisServer

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


def test_a_failure_is_logged_with_its_message_id_and_arguments_cut_short(stub_broker, stub_worker, caplog):
    @actor(broker=stub_broker, actor_name="index_document", max_retries=0)
    def index_document(document: str, *, tag: str) -> None:
        raise ValueError("cannot index")

    caplog.set_level(logging.WARNING, logger="djqueue.worker")
    sent = index_document.send("x" * 1_000_000, tag="short")
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("index_document(")]
    assert line.startswith("index_document('xxx") and "cannot index" in line
    assert sent.message_id in line, "an operator finds the dead letter by its message id"
    assert "(1,000,002 characters)" in line and "tag='short'" in line
    assert len(line) < 1_000


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


# -- a broker that cannot be reached --------------------------------------------------------


def dead_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_broker(kind: str, port: int):
    if kind == "redis":
        from djqueue.brokers.redis import RedisBroker

        return RedisBroker(f"redis://:s3cretpw@127.0.0.1:{port}/5", namespace=f"djqt{uuid.uuid4().hex[:8]}")
    from djqueue.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=f"amqp://guest:s3cretpw@127.0.0.1:{port}/%2F")


UNREACHABLE = [
    pytest.param("redis", "redis://:***@127.0.0.1:{port}/5", id="redis", marks=pytest.mark.redis),
    pytest.param(
        "rabbitmq", "amqp://guest:***@127.0.0.1:{port}/%2F", id="rabbitmq", marks=pytest.mark.rabbitmq
    ),
]


@pytest.mark.parametrize(("kind", "masked"), UNREACHABLE)
@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
def test_a_broker_that_cannot_be_reached_gives_one_warning_per_attempt(caplog, kind, masked, level):
    # The same lines on every broker, whether the worker's consumer thread reconnects
    # (Redis) or the consumer reconnects in place (RabbitMQ): one WARNING per attempt with
    # the broker's masked URL and the growing delay; a traceback only at DEBUG.
    from djqueue import Worker

    port = dead_port()
    broker = unreachable_broker(kind, port)
    queue = f"down_{uuid.uuid4().hex[:8]}"
    caplog.set_level(level, logger="djqueue")
    attempt = re.compile(
        rf"cannot consume '{queue}' from (\S+).*, trying again in ([\d.]+) s \(attempt (\d+)\): "
    )

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if attempt.match(r.getMessage())]

    worker = Worker(broker, queues=[queue], worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: len(attempts()) >= 4, timeout=10, message="four failed attempts")
    finally:
        worker.stop(timeout=5_000)
        broker.close()
    records = attempts()
    matches = [attempt.match(r.getMessage()) for r in records]
    assert [m[3] for m in matches] == [str(n) for n in range(1, len(records) + 1)]
    assert [float(m[2]) for m in matches][:4] == [0.1, 0.2, 0.4, 0.8], "a doubling backoff"
    assert {m[1] for m in matches} == {masked.format(port=port)}
    assert {r.levelno for r in records} == {logging.WARNING}
    assert all(bool(r.exc_info) == (level == logging.DEBUG) for r in records)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "s3cretpw" not in everything
    assert "<locals>" not in everything and "<lambda>" not in everything
    assert "will redeliver" not in everything
    worse = [r for r in caplog.records if r.levelno > logging.WARNING and r.name.startswith("djqueue")]
    assert not worse, [r.getMessage() for r in worse]
    if kind == "redis" and level == logging.DEBUG:
        # The consumer whose fetch failed is closed, which fails too: said at DEBUG only.
        closes = [
            r
            for r in caplog.records
            if r.getMessage().startswith(f"could not close the consumer of '{queue}'")
        ]
        assert closes and {r.levelno for r in closes} == {logging.DEBUG}
        assert "the broker delivers what it held again once its heartbeat" in closes[0].getMessage()


@pytest.mark.redis
def test_an_ack_or_nack_that_cannot_reach_the_broker_says_which_failed(caplog, tmp_path):
    # A redis-server of the test's own, killed once two messages are fetched: the worker's
    # ack of one and dead-lettering of the other fail as they would in an outage.
    from djqueue import Worker
    from djqueue.brokers.redis import RedisBroker

    server = RedisServer(tmp_path)
    server.start()
    broker = RedisBroker(server.url())
    queue = f"down_{uuid.uuid4().hex[:8]}"

    @actor(broker=broker, actor_name=f"noop_{queue}", queue_name=queue)
    def noop() -> None:
        pass

    try:
        sent = [noop.send(), noop.send()]
        consumer = broker.consume(queue, prefetch=2, timeout=1000)
        done, failed = next(consumer), next(consumer)
        assert {done.message_id, failed.message_id} == {m.message_id for m in sent}
        server.kill()
        caplog.set_level(logging.INFO, logger="djqueue")
        worker = Worker(broker, queues=[queue])  # not started: settle() is all we need
        worker.settle(consumer, done)
        failed.fail("no good")
        worker.settle(consumer, failed)
    finally:
        server.kill()
        broker.close()
    lines = [
        r for r in caplog.records if r.name == "djqueue.worker" and r.getMessage().startswith("could not")
    ]
    assert [r.getMessage().split(": ", 1)[0] for r in lines] == [
        f"could not ack message {done.message_id}",
        f"could not dead-letter message {failed.message_id}",
    ]
    for line in lines:
        assert f"cannot reach Redis at {server.url()}" in line.getMessage()
        assert line.getMessage().endswith("; it may be delivered again")
    assert {r.levelno for r in lines} == {logging.WARNING}
    assert not any(r.exc_info for r in lines), "no traceback for a lost connection, but at DEBUG"

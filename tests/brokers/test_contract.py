"""The broker contract, proved against every broker: stub, database (SQLite and
PostgreSQL), Redis and RabbitMQ. A behaviour shown here holds for all of them."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from djqueue import Message, Worker, actor
from djqueue.brokers.base import Consumer, MessageProxy
from djqueue.message import current_millis
from djqueue.models import DeadLetter
from tests.process import read_records, wait_for
from tests.testapp.tasks import record, slow_record

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


def make_message(queue: str, n: object = None, **options: object) -> Message:
    return Message(queue_name=queue, actor_name="record", args=(n,), kwargs={}, options=dict(options))


def take(consumer: Consumer, timeout: float = 10.0) -> MessageProxy:
    proxy = wait_for(lambda: next(consumer), timeout=timeout, interval=0, message="a message")
    return proxy


def take_all(broker, queue: str, count: int, prefetch: int = 1) -> list[tuple[MessageProxy, float]]:
    """The queue's next ``count`` messages, each acked, with when (monotonic) it came."""
    consumer = broker.consume(queue, prefetch=prefetch, timeout=100)
    taken = []
    for _ in range(count):
        proxy = take(consumer)
        taken.append((proxy, time.monotonic()))
        consumer.ack(proxy)
    consumer.close()
    return taken


def settled(broker, queue: str) -> bool:
    return broker.get_queue_stats(queue)[:3] == (0, 0, 0)


# -- one process ------------------------------------------------------------------------


def test_enqueue_consume_ack(case, queue):
    broker = case.make()
    sent = [broker.enqueue(make_message(queue, n)) for n in range(3)]
    assert broker.get_queue_stats(queue).ready == 3
    consumer = broker.consume(queue, prefetch=10, timeout=200)
    got = [take(consumer) for _ in range(3)]
    assert sorted(p.message_id for p in got) == sorted(m.message_id for m in sent)
    assert {p.message.args for p in got} == {(0,), (1,), (2,)}
    assert all(p.delivery_count == 1 for p in got)
    assert broker.get_queue_stats(queue).ready == 0
    for proxy in got:
        consumer.ack(proxy)
    wait_for(lambda: settled(broker, queue), message="acks to land")
    consumer.close()
    assert settled(broker, queue)


def test_prefetch_bounds_unacked_messages(case, queue):
    broker = case.make()
    for n in range(5):
        broker.enqueue(make_message(queue, n))
    consumer = broker.consume(queue, prefetch=2, timeout=200)
    first, second = take(consumer), take(consumer)
    assert next(consumer) is None, "a third message while two are unacked"
    consumer.ack(first)
    third = take(consumer)
    assert third.message_id not in (first.message_id, second.message_id)
    consumer.close()


def test_requeue_and_close_give_messages_back(case, queue):
    broker = case.make()
    sent = {broker.enqueue(make_message(queue, n)).message_id for n in range(3)}
    consumer = broker.consume(queue, prefetch=3, timeout=200)
    got = [take(consumer) for _ in range(3)]
    consumer.requeue(got[:2])
    consumer.close()  # the third is unacked: close gives it back too
    wait_for(lambda: broker.get_queue_stats(queue).ready == 3, message="all three back")
    again = broker.consume(queue, prefetch=3, timeout=200)
    assert {take(again).message_id for _ in range(3)} == sent
    again.close()


def test_a_requeue_does_not_count_as_a_delivery(case, queue):
    broker = case.make()
    sent = broker.enqueue(make_message(queue, "requeued"))
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    proxy = take(consumer)
    assert proxy.delivery_count == 1
    for _ in range(2):
        # A graceful give-back (shutdown): no delivery failed, so MaxDeliveries must not
        # come closer to dead-lettering the message.
        consumer.requeue([proxy])
        proxy = take(consumer)
        assert (proxy.message_id, proxy.delivery_count) == (sent.message_id, 1)
    consumer.ack(proxy)
    wait_for(lambda: settled(broker, queue), message="the ack")
    consumer.close()


def test_delay_and_eta_ordering(case, queue):
    broker = case.make()
    start = time.monotonic()
    late = broker.enqueue(make_message(queue, "late"), delay=1500)
    soon = broker.enqueue(make_message(queue, "soon"), delay=500)
    now = broker.enqueue(make_message(queue, "now"))
    stats = broker.get_queue_stats(queue)
    assert (stats.ready, stats.delayed) == (1, 2)
    order = [(proxy.message_id, at - start) for proxy, at in take_all(broker, queue, 3, prefetch=3)]
    assert [m for m, _ in order] == [now.message_id, soon.message_id, late.message_id]
    assert order[1][1] >= 0.45 and order[2][1] >= 1.45, order
    assert order[2][1] < 8, "a due message waited far too long"


def test_priority_ordering(case, queue):
    broker = case.make()
    if not broker.supports_priority:
        pytest.skip(f"{case.name} does not support priorities")
    for priority in (0, 5, 3, 1):  # within every broker's range (RabbitMQ's is 0 to 5)
        broker.enqueue(make_message(queue, priority, priority=priority))
    assert [proxy.message.priority for proxy, _ in take_all(broker, queue, 4)] == [5, 3, 1, 0]


def test_a_batch_keeps_each_messages_delay_priority_and_id(case, queue):
    broker = case.make()
    priorities = broker.supports_priority
    start = time.monotonic()
    eta = current_millis() + 700
    batch = [make_message(queue, n, priority=n % 3 if priorities else 0) for n in range(6)]
    batch.append(make_message(queue, "delayed", eta=eta))
    if broker.supports_cancel:
        batch.append(make_message(queue, "cancelled"))
    sent = broker.enqueue_many(batch)
    assert [m.message_id for m in sent] == [m.message_id for m in batch]
    if broker.supports_cancel:
        assert broker.cancel(sent[-1].message_id, queue_name=queue)
    stats = broker.get_queue_stats(queue)
    assert (stats.ready, stats.delayed) == (6, 1)
    taken = take_all(broker, queue, 7)
    order = [proxy.message.args[0] for proxy, _ in taken]
    ready = [n for n in range(6)]
    if priorities:  # highest first, first in first out within a priority
        ready.sort(key=lambda n: -(n % 3))
    assert order == [*ready, "delayed"]
    assert taken[-1][1] - start >= 0.65  # the delayed one came at its eta, not before


def test_queue_stats_purge_and_cancel(case, queue):
    broker = case.make()
    ready = [broker.enqueue(make_message(queue, n)) for n in range(3)]
    delayed = [broker.enqueue(make_message(queue, n), delay=60_000) for n in range(2)]
    stats = broker.get_queue_stats(queue)
    assert (stats.ready, stats.delayed, stats.in_flight) == (3, 2, 0)
    if broker.supports_cancel:
        assert broker.cancel(ready[0].message_id) is True
        assert broker.cancel(delayed[0].message_id) is True
        assert broker.cancel(ready[0].message_id) is False
        stats = broker.get_queue_stats(queue)
        assert (stats.ready, stats.delayed) == (2, 1)
    broker.purge(queue)
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)


def test_nack_dead_letters_with_a_row(case, queue):
    broker = case.make()

    @actor(broker=broker, actor_name="contract_fail", queue_name=queue, max_retries=0)
    def contract_fail(n: int) -> None:
        raise ValueError(f"no {n}")

    message = contract_fail.send(3)
    worker = Worker(broker, queues=[queue], worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        row = wait_for(lambda: DeadLetter.objects.filter(message_id=message.message_id).first())
        worker.join(timeout=10_000)
    finally:
        worker.stop(timeout=5_000)
    assert row.exception_type == "ValueError" and "no 3" in row.exception_message
    wait_for(lambda: broker.get_queue_stats(queue).dead == 1, message="the broker's dead letter")


def test_malformed_payload_is_dead_lettered_and_work_goes_on(case, queue):
    broker = case.make()
    seen = []

    @actor(broker=broker, actor_name="contract_good", queue_name=queue)
    def contract_good(n: int) -> None:
        seen.append(n)

    contract_good.send(1)
    broker.enqueue_raw(queue, b"\x00\xffnot json at all")
    broker.enqueue_raw(queue, b'{"actor_name": "contract_good"}')
    contract_good.send(2)
    worker = Worker(broker, queues=[queue], worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: DeadLetter.objects.filter(exception_type="DecodeError").count() == 2)
        wait_for(lambda: sorted(seen) == [1, 2])
        worker.join(timeout=10_000)
        assert all(t.is_alive() for t in worker.workers) and all(
            t.is_alive() for t in worker.consumers.values()
        )
    finally:
        worker.stop(timeout=5_000)
    reasons = " ".join(DeadLetter.objects.values_list("exception_message", flat=True))
    assert "not valid JSON" in reasons and "missing the field" in reasons


def test_worker_end_to_end_with_retries(case, queue):
    broker = case.make()
    attempts: dict[int, int] = {}

    @actor(broker=broker, actor_name="contract_flaky", queue_name=queue, min_backoff=10, max_backoff=50)
    def contract_flaky(n: int) -> None:
        attempts[n] = attempts.get(n, 0) + 1
        if n % 10 == 0 and attempts[n] < 2:
            raise RuntimeError("once")

    for n in range(300):
        contract_flaky.send(n)
    worker = Worker(broker, queues=[queue], worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=60_000)
    finally:
        worker.stop(timeout=5_000)
    assert set(attempts) == set(range(300))
    assert all(attempts[n] == (2 if n % 10 == 0 else 1) for n in range(300))


# -- real processes ---------------------------------------------------------------------


@pytest.fixture
def workers(case, start_processes):
    if case.in_memory:
        pytest.skip("the stub broker lives in one process")
    return functools.partial(start_processes, case.url, broker_options=case.process_options())


def ids_seen(record_dir) -> set[str]:
    return {message_id for message_id, _, _ in read_records(record_dir)}


def test_sigkilled_worker_process_loses_no_message(case, queue, record_dir, workers):
    w = workers("--processes", "1", "--threads", "4", "--queues", queue)
    (child,) = w.wait_children(1)
    broker = case.make()
    sent = {
        broker.enqueue(slow_record.message_with_options(args=(n, 0.2), queue_name=queue)).message_id
        for n in range(30)
    }
    wait_for(lambda: len(read_records(record_dir)) >= 2, message="the first jobs")
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: ids_seen(record_dir) >= sent, timeout=120, message="every message after SIGKILL")
    assert w.stop() == 0
    assert child not in w.children()


def test_graceful_shutdown_gives_back_unfinished_work(case, queue, record_dir, workers):
    w = workers("--processes", "1", "--threads", "1", "--queues", queue, "--shutdown-timeout", "300")
    w.wait_children(1)
    broker = case.make()
    long = broker.enqueue(slow_record.message_with_options(args=("long", 5), queue_name=queue))
    queued = broker.enqueue(record.message_with_options(args=("queued",), queue_name=queue))
    wait_for(lambda: broker.get_queue_stats(queue).ready == 0, message="both fetched")
    assert w.stop(timeout=30) == 0
    assert not ids_seen(record_dir) & {long.message_id}
    wait_for(
        lambda: broker.get_queue_stats(queue).ready + len(ids_seen(record_dir)) == 2, message="given back"
    )
    assert queued.message_id in ids_seen(record_dir) or broker.get_queue_stats(queue).ready == 2


@pytest.mark.slow
def test_10000_messages_through_2_processes_x_8_threads(case, queue, record_dir, workers):
    broker = case.make()
    messages = [record.message_with_options(args=(n,), queue_name=queue) for n in range(10_000)]
    sent = {m.message_id for m in broker.enqueue_many(messages)}
    assert len(sent) == 10_000
    w = workers("--processes", "2", "--threads", "8", "--queues", queue)
    wait_for(lambda: ids_seen(record_dir) >= sent, timeout=300, interval=0.5, message="10,000 messages")
    assert w.stop() == 0
    wait_for(lambda: settled(broker, queue), message="nothing left in flight")


def test_payloads_no_consumer_can_compute_with_are_dead_lettered_with_json(case, queue, monkeypatch):
    # orjson is optional. json reads Infinity and NaN, and raises RecursionError on deep
    # nesting: an eta of Infinity once put the RabbitMQ consumer in a crash loop.
    import uuid

    from djqueue import encoder

    monkeypatch.setattr(encoder, "orjson", None)
    broker = case.make()
    seen = []

    @actor(broker=broker, actor_name="contract_after_junk", queue_name=queue)
    def contract_after_junk(n: int) -> None:
        seen.append(n)

    junk = {
        str(uuid.uuid4()): f'"args":[0],"options":{{"{name}":{value}}}'
        for name, value in (("eta", "Infinity"), ("priority", "NaN"), ("retries", "-Infinity"))
    }
    junk[str(uuid.uuid4())] = '"args":' + "[" * 5000 + "]" * 5000
    for message_id, rest in junk.items():
        fields = f'"message_id":"{message_id}","queue_name":"{queue}","actor_name":"contract_after_junk"'
        payload = f"{{{fields},{rest}}}"
        broker.enqueue_raw(queue, payload.encode())
    contract_after_junk.send(1)

    def rows():
        return DeadLetter.objects.filter(message_id__in=junk)

    worker = Worker(broker, queues=[queue], worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: rows().count() == len(junk), message="every junk payload dead-lettered")
        wait_for(lambda: seen == [1], message="the good message")
        worker.join(timeout=10_000)
        assert all(t.is_alive() for t in worker.consumers.values())
    finally:
        worker.stop(timeout=5_000)
    reasons = " ".join(rows().values_list("exception_message", flat=True))
    assert "'eta'" in reasons and "'priority'" in reasons and "'retries'" in reasons
    assert "nested too deeply" in reasons
    wait_for(lambda: broker.get_queue_stats(queue).dead == len(junk), message="the broker's dead letters")


def test_a_dead_letter_keeps_what_no_json_column_holds(case, queue):
    # json reads Infinity and a lone surrogate's escape, which an older producer writes;
    # a JSON column stores neither (SQLite refuses the first, PostgreSQL both), no driver
    # encodes a lone surrogate in text, and an exception's text can carry one too.
    import uuid

    from djqueue.deadletters import MALFORMED, retry_problem

    broker = case.make()
    seen = []

    @actor(broker=broker, actor_name="contract_odd_values", queue_name=queue, max_retries=0)
    def contract_odd_values(*values: object) -> None:
        seen.append(values)
        raise ValueError("no \udbff here")

    @actor(broker=broker, actor_name="contract_after_odd", queue_name=queue)
    def contract_after_odd(n: int) -> None:
        seen.append(n)

    odd = {str(uuid.uuid4()): args for args in ("[1, Infinity]", '[{"k": "\\udbff"}]', '[{"\\udc00": 0}]')}
    for message_id, args in odd.items():
        payload = (
            f'{{"message_id":"{message_id}","queue_name":"{queue}",'
            f'"actor_name":"contract_odd_values","args":{args}}}'
        )
        broker.enqueue_raw(queue, payload.encode())
    contract_after_odd.send(1)
    worker = Worker(broker, queues=[queue], worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_for(
            lambda: DeadLetter.objects.filter(message_id__in=odd).count() == len(odd),
            message="a dead letter row for every odd message",
        )
        wait_for(lambda: 1 in seen, message="the good message")
    finally:
        worker.stop(timeout=5_000)
    assert len(seen) == len(odd) + 1, "the odd messages ran once each"
    rows = {row.message_id: row for row in DeadLetter.objects.filter(message_id__in=odd)}
    first, second, third = (rows[message_id] for message_id in odd)
    assert "Infinity" in first.raw_payload and "holds inf at args[1]" in first.exception_message
    assert "\\udbff" in second.raw_payload and "lone surrogate at args[0]['k']" in second.exception_message
    assert "\\udc00" in third.raw_payload and "lone surrogate in a key" in third.exception_message
    for row in rows.values():
        assert row.exception_type == "ValueError" and "no \\udbff here" in row.exception_message
        assert row.actor_name == "contract_odd_values" and row.args == [] and row.message == {}
        assert retry_problem(row, broker) == MALFORMED
    wait_for(lambda: broker.get_queue_stats(queue).dead == len(odd), message="the broker's dead letters")

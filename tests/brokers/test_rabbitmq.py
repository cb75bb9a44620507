"""RabbitMQ-specific behaviour of the RabbitMQ broker, against the real server on
127.0.0.1:5672. The behaviour every broker shares is in test_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import subprocess
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote

import pika
import pytest
from django.db import transaction
from pika import spec

from djqueue import Worker, actor, encoder
from djqueue.brokers.rabbitmq import (
    DELAY_LEVELS,
    RabbitmqBroker,
    dead_letter_queue,
    delay_exchange,
    delay_queue,
    delay_route,
    publish_frames,
    redelivered_queue,
)
from djqueue.brokers.rabbitmq_consumer import ack_frame
from djqueue.brokers.rabbitmq_publisher import MAX_REFUSALS, Pending
from djqueue.errors import ConfigurationError, ConnectionError, DecodeError
from djqueue.message import Message, current_millis
from djqueue.middleware.dead_letters import DeadLetters
from djqueue.models import DeadLetter
from tests.process import run_django, wait_for
from tests.relay import Relay

RABBITMQ_PORT = 5672  # the relays' target: the plain port on 127.0.0.1

pytestmark = pytest.mark.rabbitmq

URL = os.environ.get("DJQUEUE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture
def make_broker():
    """Brokers with no middleware; every queue they declared is deleted afterwards."""
    brokers: list[RabbitmqBroker] = []

    def make(**options: object) -> RabbitmqBroker:
        options.setdefault("middleware", [])
        broker = RabbitmqBroker(url=options.pop("url", URL), **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        for queue_name in broker.get_declared_queues():
            try:
                broker.delete_queue(queue_name)
            except Exception:
                pass
        broker.close()


@pytest.fixture
def broker(make_broker):
    return make_broker()


@pytest.fixture
def queue() -> str:
    return f"rq_{uuid.uuid4().hex[:10]}"


def message(queue: str, value: object = None, **options: object) -> Message:
    return Message(queue_name=queue, actor_name="record", args=(value,), kwargs={}, options=dict(options))


def take(consumer, timeout: float = 10.0):
    return wait_for(lambda: next(consumer), timeout=timeout, interval=0, message="a message")


def raw_channel():
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    return connection, connection.channel()


def close_connection(name: str) -> None:
    """Make RabbitMQ drop the client connection that introduced itself as ``name``."""

    def find() -> str | None:
        listing = subprocess.run(
            ["rabbitmqctl", "-s", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if f'{{"connection_name","{name}"}}' in properties:
                return pid
        return None

    server_name = wait_for(find, timeout=30, interval=0.2, message=f"connection {name!r}")
    subprocess.run(["rabbitmqctl", "close_connection", server_name, "test"], check=True, timeout=60)


# -- without a server -------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"x-djqueue-deliveries": 3}])
@pytest.mark.parametrize("priority", [0, 7])
@pytest.mark.parametrize("size", [0, 10, 300_000])
def test_hand_written_publish_frames_equal_pikas(priority, size, headers):
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame_max = 131072
    expected = pika.frame.Method(
        1, spec.Basic.Publish(exchange="djqueue.delay.3", routing_key="0.1.q", mandatory=True)
    ).marshal()
    properties = pika.BasicProperties(delivery_mode=2, priority=priority or None, headers=headers)
    expected += pika.frame.Header(1, len(body), properties).marshal()
    for start in range(0, len(body), frame_max - 8):
        expected += pika.frame.Body(1, body[start : start + frame_max - 8]).marshal()
    assert publish_frames(b"djqueue.delay.3", b"0.1.q", body, priority, frame_max, headers) == expected


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("tag", [1, 2**40 + 7])
def test_hand_written_ack_frames_equal_pikas(tag, multiple):
    assert ack_frame(tag, multiple) == pika.frame.Method(1, spec.Basic.Ack(tag, multiple)).marshal()


@pytest.mark.parametrize("delay", [1, 2, 3, 500, 1500, 86_400_000, 2**DELAY_LEVELS - 1])
def test_delay_route_visits_one_level_per_set_bit(delay):
    exchange, key = delay_route("my.queue", delay)
    words = key.split(".")
    bits, tail = words[:DELAY_LEVELS], words[DELAY_LEVELS:]
    assert tail == ["my", "queue"]
    levels = [DELAY_LEVELS - 1 - i for i, bit in enumerate(bits) if bit == "1"]
    # The time spent in the levels (2**level ms each) adds up to the delay exactly.
    assert sum(2**level for level in levels) == delay
    assert exchange == f"djqueue.delay.{max(levels)}"


def test_delays_are_clamped_to_the_levels():
    assert delay_route("q", 0) == delay_route("q", 1)
    assert delay_route("q", 10**15) == delay_route("q", 2**DELAY_LEVELS - 1)


def test_from_url_does_not_connect_and_describe_masks_the_password():
    broker = RabbitmqBroker.from_url(
        "amqp://user:s3cret@10.255.255.1:5672/%2F;amqps://user:s3cret@10.255.255.2/vhost", middleware=[]
    )
    assert broker.urls == [
        "amqp://user:s3cret@10.255.255.1:5672/%2F",
        "amqps://user:s3cret@10.255.255.2/vhost",
    ]
    assert "s3cret" not in broker.describe() and "***" in broker.describe()
    broker.close()


@pytest.mark.parametrize(
    "url",
    ["redis://localhost", "amqp://host/%2F?heartbeat=abc", "amqp://ok/%2F;http://bad", "localhost:5672"],
)
def test_check_url_rejects_bad_urls(url):
    with pytest.raises(ConfigurationError):
        RabbitmqBroker.check_url(url)


@pytest.mark.parametrize(
    "options",
    [
        {"queue_type": "stream"},
        {"max_priority": 256},
        {"lazy_queues": "yes"},
        {"max_unconfirmed": 0},
        {"confirm_timeout": -1},
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigurationError):
        RabbitmqBroker(url=URL, middleware=[], **options)


@pytest.fixture(params=["orjson", "json"])
def json_library(request, monkeypatch):
    """Decode with orjson, then with the standard library's json: orjson is optional."""
    if request.param == "json":
        monkeypatch.setattr(encoder, "orjson", None)
    return request.param


def raw_payload(queue: str, **options: str) -> bytes:
    """A message as a foreign producer writes it; option values are JSON text."""
    written = ",".join(f'"{name}":{value}' for name, value in options.items())
    return (
        f'{{"queue_name":"{queue}","actor_name":"record","message_id":"{uuid.uuid4()}",'
        f'"args":[1],"options":{{{written}}}}}'
    ).encode()


DEEPLY_NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("eta", "Infinity"),
        ("eta", "-Infinity"),
        ("eta", "NaN"),
        ("eta", "1e400"),  # json reads it as infinity
        ("eta", '"tomorrow"'),
        ("priority", "1e400"),
        ("priority", "NaN"),
        ("priority", "[5]"),
        ("retries", '"many"'),
        (None, None),  # nested deeply: json raises RecursionError
    ],
)
def test_payloads_no_consumer_can_compute_with_fail_to_decode(json_library, option, value):
    payload = raw_payload("q", **{option: value}) if option else DEEPLY_NESTED
    with pytest.raises(DecodeError):
        Message.decode(payload)


def test_numeric_options_that_work_still_decode(json_library):
    payload = raw_payload("q", eta="1700000000000.5", priority='"3"', retries="null")
    decoded = Message.decode(payload)
    assert decoded.options == {"eta": 1700000000000.5, "priority": "3", "retries": None}
    assert (decoded.eta, decoded.priority, decoded.retries) == (1700000000000.5, 3, 0)


# -- one consumer -----------------------------------------------------------------------


def test_enqueue_consume_ack_with_durable_persistent_messages(broker, queue):
    sent = broker.enqueue(message(queue, 1))
    connection, channel = raw_channel()
    try:
        method, properties, body = channel.basic_get(queue)
        assert properties.delivery_mode == 2 and Message.decode(body).message_id == sent.message_id
        channel.basic_nack(method.delivery_tag, requeue=True)
        # Re-declaring with the broker's arguments succeeds: they are what the queue has.
        channel.queue_declare(queue, durable=True, passive=False, arguments=broker._queue_arguments(queue))
    finally:
        connection.close()
    consumer = broker.consume(queue, prefetch=4, timeout=100)
    proxy = take(consumer)
    assert proxy.message_id == sent.message_id and proxy.delivery_count == 2  # the basic_get above
    consumer.ack(proxy)
    wait_for(lambda: broker.get_queue_stats(queue)[:3] == (0, 0, 0), message="the ack")
    consumer.close()


def test_nack_moves_the_message_to_the_dead_letter_queue(make_broker, queue):
    broker = make_broker(dead_letter_ttl=60_000)
    sent = broker.enqueue(message(queue, "bad"))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    consumer.nack(take(consumer))
    wait_for(lambda: broker.get_queue_stats(queue).dead == 1, message="the dead letter")
    connection, channel = raw_channel()
    try:
        # Declaring it with an x-message-ttl of dead_letter_ttl succeeds: that is its TTL.
        channel.queue_declare(
            dead_letter_queue(queue),
            durable=True,
            arguments={"x-message-ttl": 60_000, "x-queue-mode": "lazy"},
        )
        method, properties, body = channel.basic_get(dead_letter_queue(queue))
        assert Message.decode(body).message_id == sent.message_id
        assert properties.headers["x-death"][0]["reason"] == "rejected"
        channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)
    consumer.close()


def test_a_long_delay_does_not_hold_up_a_shorter_one(broker, queue):
    broker.declare_queue(queue)
    broker._declare_delays(queue)
    start = time.monotonic()
    late = broker.enqueue(message(queue, "late"), delay=2500)
    soon = broker.enqueue(message(queue, "soon"), delay=300)
    middle = broker.enqueue(message(queue, "middle"), delay=1100)
    assert broker.get_queue_stats(queue)[:2] == (0, 3)
    consumer = broker.consume(queue, prefetch=3, timeout=50)
    arrivals = {}
    while len(arrivals) < 3:
        proxy = take(consumer)
        arrivals[proxy.message_id] = time.monotonic() - start
        consumer.ack(proxy)
    consumer.close()
    for sent, delay in ((soon, 0.3), (middle, 1.1), (late, 2.5)):
        # Never early; late by no more than the hops through the levels take.
        assert delay <= arrivals[sent.message_id] < delay + 1.0, (delay, arrivals)
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)


def test_a_message_that_arrives_before_its_eta_goes_round_again(broker, queue):
    # What a delay longer than the levels cover (about 12 days) does: here, an eta in a
    # message published straight to the queue.
    eta = current_millis() + 1500
    broker.enqueue_raw(queue, message(queue, "later", eta=eta).encode())
    consumer = broker.consume(queue, prefetch=1, timeout=50)
    proxy = take(consumer)
    assert current_millis() >= eta - 5
    consumer.ack(proxy)
    consumer.close()


def test_higher_priority_first_and_priorities_are_clamped(broker, queue):
    for priority in (1, 50, 4, -3):  # 50 counts as max_priority (5), -3 as 0
        broker.enqueue(message(queue, priority, priority=priority))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    seen = []
    for _ in range(4):
        proxy = take(consumer)
        seen.append(proxy.message.priority)
        consumer.ack(proxy)
    consumer.close()
    assert seen == [50, 4, 1, -3]


def test_malformed_payloads_are_yielded_as_malformed_and_consuming_goes_on(broker, queue):
    broker.enqueue_raw(queue, b"\x00\xffnot json")
    good = broker.enqueue(message(queue, "good"))
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    bad = take(consumer)
    assert bad.decode_error is not None and bad.failed and bad.data == b"\x00\xffnot json"
    consumer.nack(bad)
    assert take(consumer).message_id == good.message_id
    wait_for(lambda: broker.get_queue_stats(queue).dead == 1, message="the malformed dead letter")
    consumer.close()


def test_payloads_no_consumer_can_compute_with_are_yielded_malformed(json_library, broker, queue):
    # With json, an eta of Infinity once passed the decode, and delaying it again raised
    # OverflowError out of next(); a deep payload raised RecursionError. The worker then
    # replaced the consumer, and got the same message back, for ever.
    bad = [raw_payload(queue, eta="Infinity"), DEEPLY_NESTED]
    for payload in bad:
        broker.enqueue_raw(queue, payload)
    good = broker.enqueue(message(queue, "good"))
    consumer = broker.consume(queue, prefetch=3, timeout=100)
    for payload in bad:
        proxy = take(consumer)
        assert proxy.decode_error is not None and proxy.failed and proxy.data == payload
        consumer.nack(proxy)
    assert take(consumer).message_id == good.message_id
    wait_for(lambda: broker.get_queue_stats(queue).dead == 2, message="both dead letters")
    consumer.close()


def test_a_message_the_consumer_cannot_delay_again_is_dead_lettered_not_raised(broker, queue):
    broker.ensure_queue(queue)
    connection, channel = raw_channel()
    try:
        # A delay level declared with other arguments than the broker's: declaring the
        # levels to send an early message round again raises ConfigurationError.
        channel.queue_declare(f"{queue}.XQ.0", durable=True, arguments={"x-message-ttl": 5})
    finally:
        connection.close()
    broker.enqueue_raw(queue, message(queue, "early", eta=current_millis() + 60_000).encode())
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    proxy = take(consumer)
    assert proxy.failed and "ConfigurationError" in proxy.decode_error.args[0]
    consumer.nack(proxy)
    consumer.close()
    connection, channel = raw_channel()
    try:
        # Not get_queue_stats(): it declares the levels too, and would raise.
        def dead() -> int:
            return channel.queue_declare(dead_letter_queue(queue), passive=True).method.message_count

        wait_for(lambda: dead() == 1, message="the dead letter")
    finally:
        connection.close()


def test_close_gives_unacked_messages_back_and_they_come_back_counted(broker, queue):
    sent = {broker.enqueue(message(queue, n)).message_id for n in range(3)}
    consumer = broker.consume(queue, prefetch=3, timeout=100)
    first = [take(consumer) for _ in range(3)]
    assert {p.delivery_count for p in first} == {1}
    consumer.requeue(first[:1])  # given back: not counted
    consumer.close()  # the other two end unsettled, as if the process died: counted
    again = broker.consume(queue, prefetch=3, timeout=100)
    second = {}
    while len(second) < 3:
        proxy = take(again)
        second[proxy.message_id] = proxy.delivery_count
        again.ack(proxy)  # q.RQ hands out one at a time
    assert set(second) == sent
    assert second[first[0].message_id] == 1
    assert sorted(second.values()) == [1, 2, 2]
    wait_for(lambda: broker.get_queue_stats(queue)[:3] == (0, 0, 0), message="acks")
    again.close()


def test_deliveries_are_counted_on_classic_queues(broker, queue):
    sent = broker.enqueue(message(queue, "crasher"))
    for expected in (1, 2, 3, 4):
        consumer = broker.consume(queue, prefetch=4, timeout=100)
        proxy = take(consumer)
        assert (proxy.message_id, proxy.delivery_count) == (sent.message_id, expected)
        consumer.close()  # as when the process running it dies
    connection, channel = raw_channel()
    try:
        method, properties, _ = channel.basic_get(redelivered_queue(queue))
        # Three deliveries ended unsettled before the fourth, which did too.
        assert properties.headers == {"x-djqueue-deliveries": 3} and method.redelivered
        channel.basic_nack(method.delivery_tag, requeue=False)
    finally:
        connection.close()


def test_a_much_delivered_message_is_held_alone(broker, queue):
    suspects = {broker.enqueue(message(queue, n)).message_id for n in ("a", "b")}
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    assert {take(consumer).message_id for _ in range(2)} == suspects
    consumer.close()  # both come back counted: either may be what killed the process
    fresh = {broker.enqueue(message(queue, n)).message_id for n in range(3)}
    consumer = broker.consume(queue, prefetch=10, timeout=100)
    held = {}
    while len(held) < 4:
        proxy = take(consumer)
        held[proxy.message_id] = proxy
    assert fresh < set(held), "fresh messages flow beside the held one"
    (first,) = [p for p in held.values() if p.message_id in suspects]
    assert first.delivery_count == 2
    assert next(consumer) is None, "a second much-delivered message while one is held"
    consumer.ack(first)
    second = take(consumer)
    assert second.message_id in suspects - {first.message_id} and second.delivery_count == 2
    for proxy in [second, *(held[m] for m in fresh)]:
        consumer.ack(proxy)
    wait_for(lambda: broker.get_queue_stats(queue)[:3] == (0, 0, 0), message="acks")
    consumer.close()


def test_acks_from_worker_threads_land_while_the_consumer_waits(broker, queue):
    for n in range(2):
        broker.enqueue(message(queue, n))
    consumer = broker.consume(queue, prefetch=1, timeout=5_000)
    proxy = take(consumer)
    # The consumer thread is about to block for up to 5 s; an ack from another thread
    # must reach RabbitMQ (freeing the prefetch slot) long before that.
    timer = threading.Timer(0.2, consumer.ack, args=(proxy,))
    timer.start()
    start = time.monotonic()
    second = next(consumer)
    assert second is not None and time.monotonic() - start < 2
    consumer.ack(second)
    consumer.close()
    timer.join()


def ack_together(consumer, proxies) -> None:
    """Ack from one thread per message while the socket is busy, as worker threads that
    finish during another's write do: they queue up, and one write settles them all."""
    threads = [threading.Thread(target=consumer.ack, args=(p,)) for p in proxies]
    with consumer.lock:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(consumer.settling) == len(proxies), message="acks queued")
    for thread in threads:
        thread.join(10)


def given_back_after_a_crash(broker, queue: str, consumer) -> set[str]:
    """Close ``consumer`` as a dying process would; what RabbitMQ gives back."""
    consumer.close()
    again = broker.consume(queue, prefetch=10, timeout=300)
    back = set()
    while (proxy := next(again)) is not None:
        back.add(proxy.message_id)
        again.ack(proxy)
    again.close()
    return back


@pytest.mark.parametrize("running", [0, 1, 3], ids=["first", "middle", "last"])
def test_acks_written_together_never_settle_a_message_still_running(broker, queue, running):
    for n in range(4):
        broker.enqueue(message(queue, n))
    consumer = broker.consume(queue, prefetch=4, timeout=100)
    taken = [take(consumer) for _ in range(4)]
    ack_together(consumer, [p for i, p in enumerate(taken) if i != running])
    assert given_back_after_a_crash(broker, queue, consumer) == {taken[running].message_id}


def test_a_job_s_own_enqueues_are_confirmed_before_its_ack(broker, queue):
    broker.enqueue(message(queue, "job"))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    proxy = take(consumer)

    def run_job() -> None:
        broker.enqueue(message(queue, "follow-up"))
        consumer.ack(proxy)
        assert not broker._publisher().waiting()

    thread = threading.Thread(target=run_job)
    thread.start()
    thread.join()
    assert take(consumer).args == ("follow-up",)
    consumer.close()


def test_stats_purge_and_no_cancel(broker, queue):
    ready = broker.enqueue(message(queue, 1))
    broker.enqueue(message(queue, 2), delay=60_000)
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    consumer.nack(take(consumer))
    broker.enqueue(message(queue, 3))
    # The freed prefetch slot takes message 3 at once: in flight, not ready.
    wait_for(lambda: broker.get_queue_stats(queue) == (0, 1, 1, 1), message="1 delayed, 1 in flight, 1 dead")
    consumer.close()
    wait_for(lambda: broker.get_queue_stats(queue) == (1, 1, 0, 1), message="1 ready, 1 delayed, 1 dead")
    assert broker.supports_cancel is False and broker.cancel(ready.message_id) is False
    broker.purge(queue)
    assert broker.get_queue_stats(queue) == (0, 0, 0, 0)


def test_changed_queue_arguments_raise_a_clear_error(make_broker, queue):
    make_broker(max_priority=10).ensure_queue(queue)
    changed = make_broker(max_priority=5)
    changed.declare_queue(queue)  # what defining an actor does: RabbitMQ is not asked yet
    with pytest.raises(ConfigurationError, match="x-max-priority"):
        changed.ensure_queue(queue)
    with pytest.raises(ConfigurationError, match="x-max-priority"):
        changed.enqueue(message(queue, 1))


@pytest.mark.parametrize(
    ("suffix", "holds"),
    [(".DQ", "dead letters"), (".RQ", "redelivered messages"), (".XQ.3", "delayed messages")],
)
def test_a_queue_named_like_another_queues_companion_is_refused(make_broker, queue, suffix, holds):
    # An actor on q.DQ would consume q's dead letters (and be declared with their TTL).
    broker = make_broker()
    refused = rf"keeps the {holds} of queue '{queue}' in a queue of that name"
    with pytest.raises(ConfigurationError, match=refused):

        @actor(broker=broker, queue_name=queue + suffix)
        def companion() -> None: ...

    assert broker.get_declared_queues() == set()
    broker.declare_queue(f"{queue}{suffix}x")  # only the exact suffix is the broker's


def test_classic_queues_are_lazy_unless_turned_off(make_broker, queue):
    broker = make_broker()
    broker.enqueue(message(queue, 1), delay=60_000)  # declares the delay levels too
    broker.flush()
    plain = make_broker(lazy_queues=False)
    # Each queue's arguments as the broker gives them, but for x-queue-mode.
    main = plain._queue_arguments(queue)
    arguments = {
        queue: main,
        redelivered_queue(queue): main,
        dead_letter_queue(queue): {"x-message-ttl": plain.dead_letter_ttl},
        delay_queue(queue, 0): {
            "x-message-ttl": 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
        delay_queue(queue, 15): {"x-message-ttl": 2**15, "x-dead-letter-exchange": delay_exchange(14)},
    }
    connection, channel = raw_channel()
    try:
        for name, without_mode in arguments.items():
            # RabbitMQ refuses (406) a declaration whose x-queue-mode is not the queue's.
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-mode"):
                channel.queue_declare(name, durable=True, arguments=without_mode)
            channel = connection.channel()
            channel.queue_declare(name, durable=True, arguments=without_mode | {"x-queue-mode": "lazy"})
    finally:
        connection.close()
    # A queue declared before, without the argument, is used with lazy_queues=False.
    other = f"{queue}_plain"
    plain.ensure_queue(other)
    with pytest.raises(ConfigurationError, match=r"x-queue-mode.*lazy_queues"):
        make_broker().ensure_queue(other)


def test_runworkers_does_not_start_on_a_queue_rabbitmq_has_with_other_arguments(
    make_broker, queue, start_processes
):
    make_broker(max_priority=10).ensure_queue(queue)
    workers = start_processes(URL, "--queues", queue, broker_options={"max_priority": 5})
    assert workers.process.wait(60) != 0
    assert "x-max-priority" in workers.output() and not workers.children()


def test_defining_actors_needs_no_rabbitmq_and_a_send_says_it_is_down(make_broker, queue):
    broker = make_broker(url="amqp://guest:secret@127.0.0.1:1/%2F")

    @actor(broker=broker, queue_name=queue)
    def job() -> None: ...

    assert queue in broker.get_declared_queues()
    with pytest.raises(ConnectionError, match="cannot connect to RabbitMQ") as raised:
        job.send()
    assert "secret" not in str(raised.value)


def test_a_django_project_starts_while_rabbitmq_is_down():
    # Its actors are defined (tests.testapp.tasks) when Django starts, in every process.
    done = run_django("check", DJQUEUE_BROKER_URL="amqp://guest:guest@127.0.0.1:1/%2F")
    assert done.returncode == 0, done.stderr


def test_a_deleted_queue_is_declared_again_instead_of_dropping_messages(broker, queue):
    broker.enqueue(message(queue, 1))
    connection, channel = raw_channel()
    channel.queue_delete(queue)
    connection.close()
    # The broker still believes the queue exists; RabbitMQ returns the message as
    # unroutable, and the broker declares the queue again and publishes it again.
    again = broker.enqueue(message(queue, 2))
    broker.flush()
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    assert take(consumer).message_id == again.message_id
    consumer.close()


# -- connections ------------------------------------------------------------------------


# In real life: a body over RabbitMQ's max_message_size (128 MiB on this server, too much
# for a test). An exchange that does not exist gets the same answer on every try, a
# channel close.
NO_SUCH_EXCHANGE = b"djqueue.no-such-exchange"


@pytest.fixture
def dead_lettering(make_broker, queue):
    """A broker with the DeadLetters middleware and ``queue`` declared, and this thread's
    publisher."""
    broker = make_broker(middleware=[DeadLetters()], confirm_timeout=3000)
    broker.ensure_queue(queue)
    return broker, broker._publisher()


def test_a_message_rabbitmq_always_refuses_is_dropped_and_the_thread_publishes_on(make_broker, queue, caplog):
    broker = make_broker(confirm_timeout=3000)
    broker.ensure_queue(queue)
    innocent, refused = message(queue, "innocent"), message(queue, "refused")
    # The publisher's own verb writes both, as a send does.
    entries = [
        Pending(queue, b"", queue.encode(), innocent.encode(), 0),
        Pending(queue, NO_SUCH_EXCHANGE, queue.encode(), refused.encode(), 0),
    ]
    publisher = broker._publisher()
    with caplog.at_level(logging.ERROR, logger="djqueue.broker.rabbitmq"), publisher.lock:
        # Holding the lock keeps the sweeper off: the refusals all come to the flush below.
        publisher.publish(entries, broker.max_unconfirmed)  # written, not refused yet
        with pytest.raises(ConnectionError, match=f"refused message {refused.message_id}"):
            publisher.publish([], 1)  # what flush() does
    assert not publisher.waiting(), "the refused message is kept"
    (logged,) = [r.getMessage() for r in caplog.records if refused.message_id in r.getMessage()]
    assert "404" in logged and "no-such-exchange" in logged and f"{MAX_REFUSALS} times" in logged
    # Publishing goes on, and the message sent before the refused one was not dropped (it
    # may come twice: it was published again alone, to tell which of the two was refused).
    expected = {innocent.message_id, *(broker.enqueue(message(queue, n)).message_id for n in range(3))}
    broker.flush()
    consumer = broker.consume(queue, prefetch=10, timeout=100)
    got = set()
    while not expected <= got:
        got.add(take(consumer).message_id)
    consumer.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("failure", ["returned", "refused"])
def test_a_message_the_publisher_gives_up_on_is_dead_lettered(dead_lettering, queue, monkeypatch, failure):
    # Dropped by the publisher, it would be lost although its send() returned: it gets
    # its DeadLetter row, as a message that failed for good in a worker does.
    broker, publisher = dead_lettering
    given_up = message(queue, failure)
    if failure == "returned":
        # Its queue is deleted, and declaring it again does nothing: returned every time.
        monkeypatch.setattr(broker, "_redeclare", lambda queue_name: None)
        connection, channel = raw_channel()
        channel.queue_delete(queue)
        connection.close()
        broker.enqueue(given_up)
        wait_for(lambda: not publisher.waiting(), message="the publisher to give up")
        expected = "returned it as unroutable 3 times"
    else:
        with publisher.lock:
            assert "it was dead-lettered" in give_up_on(dead_lettering, queue, given_up, failure, monkeypatch)
        expected = f"refused it {MAX_REFUSALS} times"
    row = DeadLetter.objects.get(message_id=given_up.message_id)
    assert expected in row.exception_message and row.args == [failure]
    assert (row.actor_name, row.queue_name) == ("record", queue)


class Rollback(Exception):
    pass


def give_up_on(dead_lettering, queue: str, given_up: Message, failure: str, monkeypatch) -> str | None:
    """Make the publisher give up on ``given_up`` in this thread (the test holds its lock,
    which keeps the sweeper off), returned as unroutable or refused every time; the
    error a refusal raises. ``given_up`` is put in the outbox as a message whose own send
    returned earlier: a send that went on to see all three refusals itself (RabbitMQ can
    answer that fast) would be told of its own message instead, a case of its own."""
    broker, publisher = dead_lettering
    exchange = b""
    if failure == "returned":
        monkeypatch.setattr(broker, "_redeclare", lambda queue_name: None)
        connection, channel = raw_channel()
        channel.queue_delete(queue)
        connection.close()
    else:
        exchange = NO_SUCH_EXCHANGE
    publisher.outbox.append(Pending(queue, exchange, queue.encode(), given_up.encode(), 0))
    if failure == "returned":
        publisher.publish([], 1)  # what flush() does
        return
    with pytest.raises(ConnectionError, match=f"refused message {given_up.message_id}") as raised:
        publisher.publish([], 1)
    return str(raised.value)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.parametrize("failure", ["returned", "refused"])
def test_a_dead_letter_the_publisher_writes_outlives_a_rolled_back_transaction(
    dead_lettering, queue, monkeypatch, settings, failure
):
    # The message given up on may be one whose send returned long before, in another
    # transaction or none: its row is all that is left of it, and must not roll back
    # with the transaction that the thread which noticed has open.
    settings.DATABASE_ROUTERS = ["tests.routers.DeadLettersOnPostgres"]
    _, publisher = dead_lettering
    given_up = message(queue, failure)
    with publisher.lock, pytest.raises(Rollback), transaction.atomic(using="postgres"):
        DeadLetter.objects.create(message_id=uuid.uuid4().hex, queue_name=queue, actor_name="rolled_back")
        give_up_on(dead_lettering, queue, given_up, failure, monkeypatch)
        raise Rollback
    dead = DeadLetter.objects.using("postgres").filter(queue_name=queue)
    assert [row.actor_name for row in dead] == ["record"], "the row rolled back"
    assert dead.get().message_id == given_up.message_id


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_the_row_of_a_send_that_raises_for_its_own_message_is_its_transaction_s(
    dead_lettering, queue, settings, outcome
):
    # This send is told that its own message was refused, as a send that fails is: its
    # transaction decides, as for the rest it wrote, and a rolled-back one leaves no row
    # of a job that was never sent (an admin retry's keeps the old row dead instead).
    settings.DATABASE_ROUTERS = ["tests.routers.DeadLettersOnPostgres"]
    _, publisher = dead_lettering
    given_up = message(queue, "refused")
    refused = Pending(queue, NO_SUCH_EXCHANGE, queue.encode(), given_up.encode(), 0)
    with publisher.lock, contextlib.suppress(Rollback), transaction.atomic(using="postgres"):
        with pytest.raises(ConnectionError, match="in this thread's open transaction"):
            publisher.publish([refused], 1)  # waits for its confirm: the refusals come to it
        if outcome == "rollback":
            raise Rollback
    kept = DeadLetter.objects.using("postgres").filter(message_id=given_up.message_id).exists()
    assert kept == (outcome == "commit")


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_is_written_when_the_publisher_gives_up_in_an_event_loop(
    dead_lettering, queue, monkeypatch
):
    # An async actor sends from the worker's event loop, an async view from the server's:
    # there Django refuses the ORM (SynchronousOnlyOperation), which would drop the message.
    _, publisher = dead_lettering
    given_up = message(queue, "refused")

    async def send_from_the_loop() -> str | None:
        return give_up_on(dead_lettering, queue, given_up, "refused", monkeypatch)

    with publisher.lock:
        error = asyncio.run(send_from_the_loop())
    assert "it was dead-lettered (a DeadLetter row)" in error
    assert DeadLetter.objects.get(message_id=given_up.message_id).queue_name == queue


@pytest.mark.django_db(transaction=True)
def test_in_an_open_sqlite_transaction_the_publisher_says_where_the_dead_letter_is(
    dead_lettering, queue, monkeypatch
):
    # SQLite has one writer, which this thread's transaction holds: the row is written in
    # it at once, rather than by another connection that would wait for the lock, and
    # the error says so.
    _, publisher = dead_lettering
    given_up = message(queue, "refused")
    started = time.monotonic()
    with publisher.lock, transaction.atomic():
        error = give_up_on(dead_lettering, queue, given_up, "refused", monkeypatch)
        assert "in this thread's open transaction" in error
        assert DeadLetter.objects.filter(message_id=given_up.message_id).exists()
    assert time.monotonic() - started < 10, "it waited for SQLite's lock"


def test_flush_waits_for_a_message_the_sweeper_is_moving(make_broker, queue):
    # The sweeper moves a returned or refused message from one of the publisher's lists
    # to another under its lock, and for that moment the message is in none of them.
    # flush() (and the check before an ack) must not take it for confirmed then.
    broker = make_broker()
    broker.ensure_queue(queue)
    publisher = broker._publisher()
    entry = Pending(queue, b"", queue.encode(), message(queue, "moved").encode(), 0)
    holding, flushing = threading.Event(), threading.Event()

    def sweeper() -> None:
        with publisher.lock:
            holding.set()
            flushing.wait(10)
            time.sleep(0.1)  # stages the race: flush() looks while the message is in no list
            publisher.outbox.append(entry)

    thread = threading.Thread(target=sweeper)
    thread.start()
    holding.wait(10)
    flushing.set()
    broker.flush()
    connection, channel = raw_channel()  # not get_queue_stats(), which flushes again
    ready = channel.queue_declare(queue, passive=True).method.message_count
    connection.close()
    thread.join(10)
    assert ready == 1, "flush() returned before the message was confirmed"


def test_flush_does_not_connect_for_a_publisher_with_nothing_left(make_broker, queue):
    # A publisher whose lock another thread holds counts as waiting; once it has the lock,
    # flush() must see there is nothing to confirm, not connect (here: fail) for nothing.
    broker = make_broker(url="amqp://guest:guest@127.0.0.1:1/%2F", confirm_timeout=500)
    publisher = broker._publisher()
    holding, flushing = threading.Event(), threading.Event()

    def holder() -> None:
        with publisher.lock:  # as the sweeper does, closing the publisher of a thread that exited
            holding.set()
            flushing.wait(10)
            time.sleep(0.1)  # stages the race: flush() looks while the lock is held

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(10)
    flushing.set()
    broker.flush()  # raised ConnectionError, after trying to connect
    thread.join(10)
    assert publisher.sock is None


def test_a_send_racing_close_publishes_on_a_publisher_the_broker_tracks(make_broker, queue):
    # close() closes every thread's publisher under its lock. A thread that took its
    # publisher just before, and waited for that lock, published on it afterwards: on a
    # connection it opened again, which no flush() and no sweeper knew about.
    broker = make_broker()
    broker.ensure_queue(queue)
    taken, go = threading.Event(), threading.Event()
    used: list[Any] = []

    def sender() -> None:
        broker.enqueue(message(queue, 0))
        used.append(broker._publisher())
        taken.set()
        go.wait(10)
        broker.enqueue(message(queue, 1))
        used.append(broker._local.publisher)

    thread = threading.Thread(target=sender)
    thread.start()
    taken.wait(10)
    first = used[0]
    with first.lock:  # as close() does, while the sender waits for the lock
        with broker._publishers_lock:
            broker._publishers.remove(first)
        first.retired = True
        first.close()
        go.set()
        time.sleep(0.1)  # stages the race: the sender is waiting for this lock
    thread.join(10)
    assert first.sock is None, "a closed publisher was used again"
    assert used[1] is not first and used[1] in broker._publishers
    broker.flush()
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    assert sorted(take(consumer).message.args[0] for _ in range(2)) == [0, 1]
    consumer.close()


def test_unreachable_broker_raises_connection_error(make_broker, queue):
    broker = make_broker(url="amqp://guest:guest@127.0.0.1:1/%2F", confirm_timeout=500)
    broker.queues.add(queue)  # skip the (unreachable) declaration
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot"):
        broker.enqueue(message(queue, 1))
    assert time.monotonic() - start < 3
    assert not broker._publisher().waiting(), "a failed send is not published later behind the caller's back"
    broker.queues.clear()


def test_cluster_urls_are_tried_in_turn(make_broker, queue):
    broker = make_broker(url=f"amqp://guest:guest@127.0.0.1:1/%2F;{URL}")
    sent = broker.enqueue(message(queue, 1))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    assert take(consumer).message_id == sent.message_id
    consumer.close()
    assert broker._preferred == 1, "the node that answered is tried first next time"


def test_publishing_without_confirms(make_broker, queue):
    broker = make_broker(confirm_delivery=False, urls=[URL])
    sent = [broker.enqueue(message(queue, n)).message_id for n in range(10)]
    assert not broker._publisher().waiting()
    consumer = broker.consume(queue, prefetch=10, timeout=100)
    assert [take(consumer).message_id for _ in range(10)] == sent
    consumer.close()


@pytest.mark.parametrize("confirm_delivery", [True, False])
def test_the_connections_of_threads_that_exited_are_closed(make_broker, queue, confirm_delivery):
    broker = make_broker(confirm_delivery=confirm_delivery)
    broker.ensure_queue(queue)
    publishers = []

    def send(n: int) -> None:  # one request of a thread-per-request server
        broker.enqueue(message(queue, n))
        publishers.append(broker._publisher())

    for n in range(5):
        thread = threading.Thread(target=send, args=(n,))
        thread.start()
        thread.join()
    assert len(set(publishers)) == 5
    wait_for(lambda: not set(broker._publishers) & set(publishers), message="their publishers dropped")
    assert all(p.sock is None for p in publishers), "a connection left open"
    assert broker.get_queue_stats(queue).ready == 5


def test_strict_confirms_wait_for_each_message(make_broker, queue):
    broker = make_broker(max_unconfirmed=1)
    broker.enqueue(message(queue, 1))
    assert not broker._publisher().waiting()


def test_publisher_publishes_again_after_its_connection_is_dropped(broker, queue):
    broker.enqueue(message(queue, 0))
    close_connection(broker._publisher().connection_name)
    sent = [broker.enqueue(message(queue, n)).message_id for n in range(1, 50)]
    broker.flush()
    assert broker.get_queue_stats(queue).ready == 50
    consumer = broker.consume(queue, prefetch=50, timeout=100)
    got = {take(consumer).message_id for _ in range(50)}
    assert set(sent) <= got
    consumer.close()


def test_after_a_lost_connection_stale_tags_are_never_acked(broker, queue):
    sent = {broker.enqueue(message(queue, n)).message_id for n in range(3)}
    consumer = broker.consume(queue, prefetch=3, timeout=200)
    old = [take(consumer) for _ in range(3)]
    close_connection(consumer.connection_name)
    # The consumer reconnects by itself; RabbitMQ redelivers the unacked messages (tags 1
    # to 3 again, on the new channel), which go round through q.RQ, counted.
    new = take(consumer, timeout=30)
    assert new.message_id in sent and new.delivery_count == 2
    for proxy in old:
        consumer.ack(proxy)  # must not ack a new delivery, whatever its tag
    next(consumer)
    assert consumer.holding() == 1
    consumer.close()
    wait_for(lambda: broker.get_queue_stats(queue).ready == 3, message="all three back in the queue")


def test_a_give_back_that_outlives_its_connection_never_settles_a_delivery_of_the_next(broker, queue):
    for n in range(3):
        broker.enqueue(message(queue, n))
    consumer = broker.consume(queue, prefetch=3, timeout=200)
    first, second, third = (take(consumer) for _ in range(3))
    consumer.ack(first)
    consumer.ack(second)
    close_connection(consumer.connection_name)
    broker.enqueue(message(queue, "fresh"))
    # On the new channel, tag 1 is `third` redelivered (sent round through q.RQ and
    # acked); tags 2 and 3 are the fresh message and that copy: running now.
    running = [take(consumer, timeout=30) for _ in range(2)]
    assert third.tag[1] in {proxy.tag[1] for proxy in running}
    # A give-back (requeue at shutdown) whose connection died while it republished.
    consumer._return([(third.tag, queue, third.data, 0, 0)])
    # It may publish a copy (at least once); it must not settle what is running.
    assert all(proxy.tag[1] in consumer.unsettled for proxy in running), "settled by a stale tag"
    consumer.close()


@pytest.mark.django_db(transaction=True)
def test_worker_survives_a_lost_consumer_connection_without_losing_messages(make_broker, queue):
    broker = make_broker(middleware=None)
    done: dict[str, int] = {}
    lock = threading.Lock()

    @actor(broker=broker, actor_name="rq_slowish", queue_name=queue)
    def slowish(n: int) -> None:
        time.sleep(0.005)
        with lock:
            done[n] = done.get(n, 0) + 1

    for n in range(300):
        slowish.send(n)
    worker = Worker(broker, queues=[queue], worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: len(done) >= 50, message="the first 50")
        close_connection(worker.consumers[queue].consumer.connection_name)
        wait_for(lambda: len(done) == 300, timeout=60, message="all 300 after the reconnect")
        worker.join(timeout=30_000)
    finally:
        worker.stop(timeout=5_000)
    assert set(done) == set(range(300))
    assert broker.get_queue_stats(queue) == (0, 0, 0, 0)


@pytest.fixture
def relay():
    relay = Relay(RABBITMQ_PORT)
    yield relay
    relay.close()


@pytest.fixture
def tls_url(tmp_path):
    """An amqps:// URL: a TLS-terminating relay in front of the plain RabbitMQ port."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
    command += f" -addext subjectAltName=DNS:localhost -keyout {key} -out {cert}"
    subprocess.run(command.split(), check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    relay = Relay(RABBITMQ_PORT, context)
    options = quote(repr({"ca_certs": str(cert), "server_hostname": "localhost"}))
    yield f"amqps://guest:guest@localhost:{relay.port}/%2F?ssl_options={options}"
    relay.close()


def test_unconfirmed_messages_are_published_again_on_a_new_connection(relay, make_broker, queue):
    broker = make_broker(url=f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F")
    first = broker.enqueue(message(queue, "first")).message_id
    broker.flush()
    relay.hold.set()  # RabbitMQ gets the messages; its confirms do not come back
    sent = [broker.enqueue(message(queue, n)).message_id for n in range(20)]
    publisher = broker._publisher()
    assert len(publisher.unconfirmed) == 20
    relay.cut()
    relay.hold.clear()
    broker.flush()  # finds the connection gone, connects again, publishes the 20 again
    assert not publisher.waiting()
    # At least once: the copies that reached RabbitMQ before the cut are there too.
    ready = broker.get_queue_stats(queue).ready
    assert 21 <= ready <= 41
    consumer = broker.consume(queue, prefetch=ready, timeout=100)
    got = [take(consumer).message_id for _ in range(ready)]
    assert set(got) == {first, *sent}
    consumer.close()


def test_a_publish_that_is_never_confirmed_raises(relay, make_broker, queue):
    broker = make_broker(url=f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F", max_unconfirmed=1)
    broker.declare_queue(queue)
    broker.enqueue(message(queue, "confirmed"))
    relay.hold.set()
    broker.confirm_timeout = 500
    with pytest.raises(ConnectionError, match="did not confirm"):
        broker.enqueue(message(queue, "unconfirmed"))
    relay.hold.clear()
    assert not broker._publisher().waiting(), "the caller was told: it is not published behind its back"


@pytest.mark.parametrize("verb", ["ack", "nack"])
def test_a_settlement_whose_job_s_sends_are_unconfirmed_gives_the_delivery_back(
    relay, make_broker, queue, verb
):
    broker = make_broker(url=f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F")
    job = broker.enqueue(message(queue, "job"))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    proxy = take(consumer)
    broker.confirm_timeout = 300
    # RabbitMQ's answers are held back (what a publisher blocked by a resource alarm
    # sees): the job's follow-up is never confirmed, so its message cannot be settled.
    relay.hold.set()
    try:
        follow_up = broker.enqueue(message(queue, "follow-up"))
        with pytest.raises(ConnectionError, match="did not confirm"):
            getattr(consumer, verb)(proxy)
        assert not consumer.unsettled, "the delivery is still held by a live connection"
    finally:
        relay.hold.clear()
    # Given back with a basic.reject (requeue): neither acked nor dead-lettered, it comes
    # back, counted as after a crash; the sweeper publishes the follow-up again.
    seen = {}
    while len(seen) < 2:
        again = take(consumer)
        seen[again.message_id] = again.delivery_count
        consumer.ack(again)
    assert seen == {job.message_id: 2, follow_up.message_id: 1}
    consumer.close()


def test_a_returned_message_is_kept_while_its_queue_cannot_be_declared_again(relay, make_broker, queue):
    broker = make_broker(url=f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F")
    broker.enqueue(message(queue, "first"))
    broker.flush()
    connection, channel = raw_channel()
    try:
        # Behind the broker's back: the queue is gone (a message for it comes back as
        # unroutable), and its q.RQ has other arguments, so declaring it again fails.
        channel.queue_delete(queue)
        channel.queue_delete(redelivered_queue(queue))
        channel.queue_declare(redelivered_queue(queue), durable=True)
        relay.hold.set()  # the return arrives after the send returned, as it mostly does
        try:
            sent = broker.enqueue(message(queue, "returned"))
        finally:
            relay.hold.clear()
        for _ in range(2):  # kept, not dropped, whichever of flush and the sweeper tried
            with pytest.raises(ConnectionError, match="returned as unroutable"):
                broker.flush()
            assert broker._publisher().returned
        channel.queue_delete(redelivered_queue(queue))  # fixed: declaring works again
    finally:
        connection.close()
    broker.flush()
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    assert take(consumer).message_id == sent.message_id
    consumer.close()


def test_a_send_whose_message_is_returned_and_cannot_be_placed_raises_and_is_not_sent_later(
    make_broker, queue
):
    broker = make_broker(max_unconfirmed=1)  # each send waits for its confirm, or return
    broker.enqueue(message(queue, "first"))
    connection, channel = raw_channel()
    try:
        channel.queue_delete(queue)
        channel.queue_delete(redelivered_queue(queue))
        channel.queue_declare(redelivered_queue(queue), durable=True)
        with pytest.raises(ConnectionError, match="returned as unroutable"):
            broker.enqueue(message(queue, "refused"))
        assert not broker._publisher().waiting(), "the caller was told: it is not published behind its back"
        channel.queue_delete(redelivered_queue(queue))
    finally:
        connection.close()


def test_amqps_urls_work(tls_url, make_broker, queue):
    broker = make_broker(url=tls_url)
    sent = [broker.enqueue(message(queue, n)).message_id for n in range(20)]
    delayed = broker.enqueue(message(queue, "later"), delay=200)
    consumer = broker.consume(queue, prefetch=5, timeout=100)
    got = []
    for _ in range(21):
        proxy = take(consumer)
        got.append(proxy.message_id)
        consumer.ack(proxy)
    assert got == [*sent, delayed.message_id]
    consumer.close()


# -- quorum queues ----------------------------------------------------------------------


def test_quorum_queue_path(make_broker, queue):
    broker = make_broker(queue_type="quorum")
    assert broker.supports_priority is False
    first = broker.enqueue(message(queue, 1))
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    proxy = take(consumer)
    assert proxy.delivery_count == 1
    consumer.requeue([proxy])
    proxy = take(consumer)
    assert proxy.message_id == first.message_id and proxy.delivery_count == 1  # not counted
    consumer.close()
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    proxy = take(consumer)
    assert proxy.message_id == first.message_id and proxy.delivery_count == 2
    consumer.nack(proxy)
    wait_for(lambda: broker.get_queue_stats(queue).dead == 1, message="the dead letter")
    start = time.monotonic()
    delayed = broker.enqueue(message(queue, 2), delay=300)
    assert take(consumer).message_id == delayed.message_id
    assert time.monotonic() - start >= 0.29
    consumer.close()
    connection, channel = raw_channel()
    try:
        # It really is a quorum queue: re-declaring it as classic fails.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.queue_declare(
                queue, durable=True, arguments=broker._queue_arguments(queue) | {"x-queue-type": "classic"}
            )
    finally:
        connection.close()


# -- a worker ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_worker_runs_1500_messages_end_to_end(make_broker, queue):
    broker = make_broker(middleware=None)
    seen: list[int] = []
    lock = threading.Lock()

    @actor(broker=broker, actor_name="rq_collect", queue_name=queue)
    def collect(n: int) -> None:
        with lock:
            seen.append(n)

    broker.enqueue_many([collect.message(n) for n in range(1000)])
    for n in range(1000, 1500):
        collect.send(n)
    worker = Worker(broker, queues=[queue], worker_threads=8, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=60_000)
    finally:
        worker.stop(timeout=5_000)
    assert sorted(seen) == list(range(1500))
    assert broker.get_queue_stats(queue) == (0, 0, 0, 0)


def test_an_idle_consumer_keeps_its_connection_with_heartbeats(make_broker, queue):
    # RabbitMQ closes a connection that misses two heartbeats: with a 1 s heartbeat an
    # idle consumer that sent none would be cut off, and reconnect, within 3 s.
    broker = make_broker(url=URL + ("&" if "?" in URL else "?") + "heartbeat=1")
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    assert consumer.heartbeat == 1
    generation = consumer.generation
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert next(consumer) is None
    assert consumer.generation == generation, "the connection was dropped while idle"
    sent = broker.enqueue(message(queue, "after idling"))
    assert take(consumer).message_id == sent.message_id
    consumer.close()

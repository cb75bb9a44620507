"""djqueue's actors for the benchmarks (autodiscovered by runworkers)."""

from __future__ import annotations

from benchmarks import work
from djqueue import actor


@actor(queue_name=work.QUEUE, actor_name="bench.noop", max_retries=0)
def noop() -> None:
    work.noop()


@actor(queue_name=work.QUEUE, actor_name="bench.sleepy", max_retries=0)
def sleepy() -> None:
    work.sleepy()


@actor(queue_name=work.QUEUE, actor_name="bench.ping", max_retries=0)
def ping(sent_at: float) -> None:
    work.ping(sent_at)


ACTORS = {"noop": noop, "sleepy": sleepy, "ping": ping}


def send(name: str, *args: object) -> None:
    ACTORS[name].send(*args)


def send_batch(name: str, count: int) -> None:
    target = ACTORS[name]
    target.broker.enqueue_many(target.message() for _ in range(count))


def flush() -> None:
    # RabbitMQ: a send returns once its message is written, and the publisher confirms
    # stream back afterwards; an enqueue is timed until RabbitMQ confirmed every message.
    # The other brokers have stored a message when its send returns.
    broker_flush = getattr(noop.broker, "flush", None)
    if broker_flush is not None:
        broker_flush()


def close() -> None:
    noop.broker.close()

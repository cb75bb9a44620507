"""The Dramatiq side: ``dramatiq benchmarks.peers.dramatiq_app -p P -t T -Q QUEUE``.

Dramatiq's default middleware stack, no results backend. The broker is chosen by
``BENCH_BROKER`` (redis or rabbitmq) and uses a Redis DB / queue names reserved for
benchmarks.
"""

from __future__ import annotations

import os

import dramatiq

from benchmarks import work

BROKER = os.environ.get("BENCH_BROKER", "redis")

if BROKER == "redis":
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(
        url=os.environ.get("BENCH_DRAMATIQ_REDIS_URL", "redis://127.0.0.1:6379/12"),
        namespace=f"dramatiq-{work.KEY.replace(':', '-')}",
    )
elif BROKER == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
else:
    raise SystemExit(f"dramatiq has no {BROKER!r} broker")

dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=work.QUEUE, max_retries=0)
def noop() -> None:
    work.noop()


@dramatiq.actor(queue_name=work.QUEUE, max_retries=0)
def sleepy() -> None:
    work.sleepy()


@dramatiq.actor(queue_name=work.QUEUE, max_retries=0)
def ping(sent_at: float) -> None:
    work.ping(sent_at)


ACTORS = {"noop": noop, "sleepy": sleepy, "ping": ping}


def send(name: str, *args: object) -> None:
    ACTORS[name].send(*args)


def send_batch(name: str, count: int) -> None:
    # Dramatiq has no pipelined batch enqueue; group().run() is its batch API.
    dramatiq.group(ACTORS[name].message() for _ in range(count)).run()


def flush() -> None:
    """Nothing to flush: Dramatiq publishes to RabbitMQ without confirms (its default; the
    client then waits for the queue to hold every message) and to Redis with a round trip."""


def close() -> None:
    broker.close()

"""The Celery side: ``celery -A benchmarks.peers.celery_app worker -P threads -c 8 -Q QUEUE``.

Configured for the same guarantee as the others (``task_acks_late``: a message is
acked after its task finished), no result backend, and no gossip/mingle/heartbeat
chatter between workers.
"""

from __future__ import annotations

import os

from celery import Celery, group

from benchmarks import work

BROKER = os.environ.get("BENCH_BROKER", "redis")
URLS = {
    "redis": os.environ.get("BENCH_CELERY_REDIS_URL", "redis://127.0.0.1:6379/13"),
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
}

app = Celery("bench", broker=URLS[BROKER])
app.conf.update(
    task_default_queue=work.QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    work.noop()


@app.task(name="bench.sleepy")
def sleepy() -> None:
    work.sleepy()


@app.task(name="bench.ping")
def ping(sent_at: float) -> None:
    work.ping(sent_at)


TASKS = {"noop": noop, "sleepy": sleepy, "ping": ping}


def send(name: str, *args: object) -> None:
    TASKS[name].delay(*args)


def send_batch(name: str, count: int) -> None:
    group(TASKS[name].s() for _ in range(count)).apply_async()


def flush() -> None:
    """Nothing to flush: Celery publishes without confirms (its default; on RabbitMQ the
    client then waits for the queue to hold every message)."""


def close() -> None:
    app.pool.force_close_all()

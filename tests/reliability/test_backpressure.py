"""Scenario 6, slow consumer / backpressure: with 100,000 messages queued for a slow
actor, a worker holds no more than its prefetch (in flight, per the broker) and its
memory is what it was with 1,000 queued: bounded by the prefetch, not the queue."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.process import wait_for
from tests.reliability.conftest import count_lines, rss_kib
from tests.testapp.tasks import slow_record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]

SMALL, LARGE = 1_000, 100_000
THREADS = 2
PREFETCH = THREADS * 2  # runworkers' default
CHUNK = 5_000


def in_flight(broker, case_name: str, queue: str) -> int:
    """Unacked messages of the queue, across every process."""
    if case_name != "rabbitmq":
        return broker.get_queue_stats(queue).in_flight
    # Over AMQP RabbitMQ reports only ready counts; rabbitmqctl knows the unacked ones.
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue:
            return int(fields[1])
    raise AssertionError(f"{queue} is not in rabbitmqctl list_queues")


def enqueue(broker, queue: str, count: int) -> None:
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        broker.enqueue_many(
            [slow_record.message_with_options(args=(i, 0.05), queue_name=queue) for i in range(n)]
        )


def measure(pid: int, broker, case_name: str, queue: str, record_dir, runs: int) -> tuple[int, int]:
    """(RSS in KiB, most messages in flight) once ``runs`` more messages have run."""
    target = count_lines(record_dir) + runs
    most = 0
    while count_lines(record_dir) < target:
        most = max(most, in_flight(broker, case_name, queue))
        time.sleep(0.2)
    return rss_kib(pid), most


def test_worker_memory_is_bounded_by_prefetch_not_queue_length(case, queue, record_dir, workers, figures):
    broker = case.make()
    enqueue(broker, queue, SMALL)
    w = workers(
        case.url, "--processes", "1", "--threads", str(THREADS), "--queues", queue,
        "--shutdown-timeout", "2000", broker_options=case.process_options(),
    )  # fmt: skip
    (pid,) = w.wait_children(1)
    wait_for(lambda: count_lines(record_dir) >= 20, timeout=60, message="the first slow jobs")
    rss_small, most_small = measure(pid, broker, case.name, queue, record_dir, 40)
    enqueue(broker, queue, LARGE - SMALL)
    ready = broker.get_queue_stats(queue).ready
    assert ready > LARGE * 0.9, f"only {ready} ready"
    rss_large, most_large = measure(pid, broker, case.name, queue, record_dir, 40)
    assert w.children() == [pid]
    assert max(most_small, most_large) <= PREFETCH, (most_small, most_large)
    growth = rss_large - rss_small
    assert growth < 3 * 1024, f"RSS grew {growth} KiB with {LARGE:,} queued instead of {SMALL:,}"
    broker.purge(queue)
    assert w.stop() == 0
    figures.add(
        "6. slow consumer (1 process x 2 threads, prefetch 4)", case.name, messages=LARGE,
        faults=f"{LARGE:,} queued for a 50 ms actor", lost="-", duplicated="-",
        in_flight_max=max(most_small, most_large),
        rss_mib=f"{rss_small / 1024:.1f} ({SMALL:,} queued) / {rss_large / 1024:.1f} ({LARGE:,} queued)",
    )  # fmt: skip

"""``runworkers --metrics-port``: real supervisor and worker processes, scraped over HTTP."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.db import connections
from prometheus_client.parser import text_string_to_metric_families

from djqueue.brokers import broker_from_url
from tests.process import free_port, read_records, wait_for
from tests.testapp.tasks import always_fail, slow_record

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

BROKER_URL = "db://default"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def broker():
    broker = broker_from_url(BROKER_URL)
    yield broker
    broker.close()
    for connection in connections.all():
        connection.close()


@pytest.fixture
def queue() -> str:
    return f"mx_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def workers(start_processes):
    return functools.partial(start_processes, BROKER_URL)


def send(broker, actor, *args, queue: str, **options):
    return broker.enqueue(actor.message_with_options(args=args, queue_name=queue, **options))


def test_metrics_are_summed_over_worker_processes(broker, queue, record_dir, workers):
    for n in range(3):
        broker.enqueue(slow_record.message_with_options(args=(n,), queue_name=queue), delay=600_000)
    port = free_port()
    w = workers("--processes", "2", "--threads", "2", "--queues", queue, "--metrics-port", str(port))
    w.wait_children(2)
    sent = {send(broker, slow_record, n, 0.1, queue=queue).message_id for n in range(24)}
    failing = send(broker, always_fail, "x", queue=queue)
    wait_for(lambda: {m for m, _, _ in read_records(record_dir)} >= sent, timeout=60, message="24 messages")
    assert len({pid for _, pid, _ in read_records(record_dir)}) == 2, "both processes took work"

    labels = {"queue_name": queue, "actor_name": "slow_record"}
    failing_labels = {"queue_name": queue, "actor_name": "always_fail"}
    samples = wait_for(
        lambda: (
            (s := scrape(port))
            and sample(s, "djqueue_messages_total", **labels) == 24
            and sample(s, "djqueue_dead_letters_total", **failing_labels) == 1
            and s
        ),
        timeout=30,
        message=f"metrics of 24 messages and 1 dead letter (failing: {failing.message_id})",
    )
    assert sample(samples, "djqueue_message_errors_total", **labels) == 0
    assert sample(samples, "djqueue_message_duration_seconds_count", **labels) == 24
    assert sample(samples, "djqueue_message_duration_seconds_sum", **labels) >= 24 * 0.1
    assert sample(samples, "djqueue_messages_inprogress", **labels) == 0
    assert sample(samples, "djqueue_messages_total", **failing_labels) == 3
    assert sample(samples, "djqueue_message_errors_total", **failing_labels) == 3
    assert sample(samples, "djqueue_message_retries_total", **failing_labels) == 2
    # Sampled by the supervisor: the 3 delayed messages sent before it started.
    assert sample(samples, "djqueue_queue_depth", queue_name=queue, state="delayed") == 3
    assert sample(samples, "djqueue_queue_depth", queue_name=queue, state="ready") == 0

    files_line = re.search(r"serving metrics on \S+ \(files in (\S+)\)", w.output())
    assert files_line, w.output()
    assert w.stop() == 0
    assert not Path(files_line.group(1)).exists(), "the run's metrics directory is removed"
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_killed_worker_keeps_its_counts_but_not_its_running_messages(broker, queue, record_dir, workers):
    port = free_port()
    # A short lease so that the killed worker's message comes back quickly.
    w = workers(
        "--processes", "1", "--threads", "2", "--queues", queue, "--metrics-port", str(port),
        broker_options={"lease": 1500},
    )  # fmt: skip
    [child] = w.wait_children(1)
    done = send(broker, slow_record, "done", 0, queue=queue)
    send(broker, slow_record, "long", 60, queue=queue)
    labels = {"queue_name": queue, "actor_name": "slow_record"}
    wait_for(
        lambda: (s := scrape(port)) and sample(s, "djqueue_messages_inprogress", **labels) == 1,
        message="the long message running",
    )
    assert done.message_id in {m for m, _, _ in read_records(record_dir)}
    # Acks are written in batches: kill only once the finished message is acked.
    wait_for(lambda: broker.get_queue_stats(queue)[:3] == (0, 0, 1), message="only the long message held")
    os.kill(child, signal.SIGKILL)
    # The broker gives the long message to the restarted process, which starts it again.
    try:
        samples = wait_for(
            lambda: (s := scrape(port)) and sample(s, "djqueue_messages_total", **labels) == 3 and s,
            message="the long message started again",
        )
    except AssertionError:
        s = scrape(port)
        print({k: v for k, v in s.items() if "bucket" not in k[0]})
        print(w.output())
        print(read_records(record_dir))
        print(broker.get_queue_stats(queue))
        raise
    assert child not in w.children()
    # The dead process's counters stay in the sum (1 + 1, plus 1 now); its running
    # message does not (1, not 2).
    assert sample(samples, "djqueue_messages_inprogress", **labels) == 1
    assert w.stop() == 0


def test_a_taken_port_is_a_clear_error(queue, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = workers("--processes", "1", "--queues", queue, "--metrics-port", str(port))
        assert w.process.wait(60) != 0
    assert f"cannot serve metrics on http://127.0.0.1:{port}/metrics" in w.output()

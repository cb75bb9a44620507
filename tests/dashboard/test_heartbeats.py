"""The Heartbeats middleware: worker rows and per-minute counts, in one process and in
real runworkers processes."""

from __future__ import annotations

import os
import uuid

import pytest
from django.db import connections
from django.db.models import Sum

from djqueue import Worker, actor
from djqueue.brokers import broker_from_url
from djqueue.middleware.heartbeats import Heartbeats
from djqueue.models import ThroughputMinute, WorkerHeartbeat
from tests.process import start_workers, wait_for
from tests.testapp.tasks import always_fail, record

pytestmark = pytest.mark.django_db(transaction=True)


def totals() -> tuple[int, int]:
    sums = ThroughputMinute.objects.aggregate(p=Sum("processed"), f=Sum("failed"))
    return sums["p"] or 0, sums["f"] or 0


def test_counts_and_heartbeat_of_one_process(stub_broker):
    heartbeats = Heartbeats(interval=0.05)
    stub_broker.add_middleware(heartbeats)
    queue = f"h_{uuid.uuid4().hex[:8]}"

    @actor(broker=stub_broker, actor_name=f"ok_{queue}", queue_name=queue)
    def ok() -> None: ...

    @actor(broker=stub_broker, actor_name=f"bad_{queue}", queue_name=queue, max_retries=1, min_backoff=1)
    def bad() -> None:
        raise ValueError("no")

    for _ in range(5):
        ok.send()
    bad.send()
    stub_broker.enqueue_raw(queue, b"garbage")
    worker = Worker(stub_broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        worker.join(timeout=10_000)
        # 5 successes, 2 runs of bad (both raised), 1 undecodable message dead-lettered.
        wait_for(lambda: totals() == (8, 3), timeout=10, message=f"counts flushed, have {totals()}")
        row = wait_for(lambda: WorkerHeartbeat.objects.filter(pid=os.getpid()).first(), message="heartbeat")
        assert row.worker_id == heartbeats.worker_id and row.queues == [queue] and row.threads == 2
        wait_for(lambda: WorkerHeartbeat.objects.get(pk=row.pk).processed == 8, message="totals on the row")
        assert WorkerHeartbeat.objects.get(pk=row.pk).failed == 3
    finally:
        worker.stop(timeout=5_000)
    assert not WorkerHeartbeat.objects.filter(worker_id=heartbeats.worker_id).exists(), "row removed at stop"


def test_counts_from_two_processes_add_up(stub_broker):
    # Two middleware instances stand for two processes writing the same minute rows.
    first, second = Heartbeats(), Heartbeats()
    for _ in range(3):
        first._count(False)
    second._count(True)
    first.flush()
    second.flush()
    first._count(False)
    first.flush()
    assert totals() == (5, 1) and ThroughputMinute.objects.count() == 1


@pytest.mark.slow
def test_runworkers_processes_report_in_and_leave(tmp_path, record_dir):
    broker = broker_from_url("db://default")
    queue = f"hw_{uuid.uuid4().hex[:8]}"
    try:
        w = start_workers(tmp_path, "db://default", "--processes", "2", "--threads", "2", "--queues", queue)
        try:
            children = w.wait_children(2)
            rows = wait_for(
                lambda: (r := list(WorkerHeartbeat.objects.filter(pid__in=children))) and len(r) == 2 and r,
                message="a heartbeat from each worker process",
            )
            assert all(r.queues == [queue] and r.threads == 2 for r in rows)
            for n in range(6):
                broker.enqueue(record.message_with_options(args=(n,), queue_name=queue))
            broker.enqueue(always_fail.message_with_options(args=("x",), queue_name=queue))
            # always_fail runs 3 times (2 retries), each a failure.
            wait_for(lambda: totals() == (9, 3), timeout=30, message=f"counts, have {totals()}")
            assert w.stop() == 0
        finally:
            if w.process.poll() is None:
                w.process.kill()
                w.process.wait(10)
        assert not WorkerHeartbeat.objects.filter(pid__in=children).exists(), "rows removed at shutdown"
    finally:
        broker.close()
        for connection in connections.all():
            connection.close()

"""Scenario 5, soak: many no-op messages through one worker process. Resident memory
after the first 20,000 messages grows by less than 10 % (no leak), and the process's
database connections and open descriptors stay bounded.

Sized for CI: the full 200,000 on Redis and PostgreSQL; fewer on SQLite and RabbitMQ,
whose single-process rate on a 2-core machine would take several minutes (the counts
are in the figures table)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connections

from djqueue.models import DeadLetter
from tests.process import wait_for
from tests.reliability.conftest import count_lines, executions, open_fds, rss_kib
from tests.testapp.tasks_reliability import noop

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]

SIZES = {"sqlite": 60_000, "postgres": 200_000, "redis": 200_000, "rabbitmq": 60_000}
WARM_UP = 20_000
CHUNK = 5_000


def pg_connections() -> int:
    """Connections to the PostgreSQL test database, from a connection of our own."""
    wrapper = connections.create_connection("postgres")
    try:
        with wrapper.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [wrapper.settings_dict["NAME"]],
            )
            return int(cursor.fetchone()[0])
    finally:
        wrapper.close()


class Sampler(threading.Thread):
    """Samples the worker's RSS, descriptors and database connections every 0.5 s."""

    def __init__(self, pid: int, case_name: str, record_dir) -> None:
        super().__init__(daemon=True)
        self.pid, self.case_name, self.record_dir = pid, case_name, record_dir
        self.samples: list[dict[str, int]] = []
        self.stop = threading.Event()

    def sample(self) -> dict[str, int]:
        values = {"done": count_lines(self.record_dir), "rss": rss_kib(self.pid), "fds": open_fds(self.pid)}
        if self.case_name == "sqlite":
            values["db"] = open_fds(self.pid, containing=".sqlite3")
        if self.case_name == "postgres":
            values["db"] = pg_connections()
        return values

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append(self.sample())
            except (OSError, AssertionError):
                return  # the process is gone: the test fails on its own


def test_soak_memory_and_connections_stay_bounded(case, queue, record_dir, workers, figures):
    total = SIZES[case.name]
    broker = case.make()
    started = time.monotonic()
    sent: set[str] = set()
    for start in range(0, total, CHUNK):
        messages = [noop.message_with_options(queue_name=queue) for _ in range(min(CHUNK, total - start))]
        sent.update(m.message_id for m in broker.enqueue_many(messages))
    enqueue_seconds = time.monotonic() - started
    w = workers(
        case.url,
        "--processes",
        "1",
        "--threads",
        "8",
        "--queues",
        queue,
        broker_options=case.process_options(),
    )
    (pid,) = w.wait_children(1)
    sampler = Sampler(pid, case.name, record_dir)
    sampler.start()
    run_started = time.monotonic()
    try:
        wait_for(
            lambda: count_lines(record_dir) >= total, timeout=400, interval=1.0, message=f"{total} messages"
        )
    finally:
        sampler.stop.set()
        sampler.join(10)
    run_seconds = time.monotonic() - run_started
    samples = sampler.samples
    assert w.children() == [pid], "the worker process was replaced during the soak"
    warm = [s for s in samples if s["done"] >= WARM_UP]
    assert len(warm) >= 3, f"too few samples after the warm-up: {samples[-3:]}"
    baseline, final = warm[0], warm[-1]
    peak_rss = max(s["rss"] for s in warm)
    growth = (peak_rss - baseline["rss"]) / baseline["rss"]
    assert growth < 0.10, f"RSS grew {growth:.1%}: {baseline['rss']} -> {peak_rss} KiB"
    assert final["fds"] <= baseline["fds"] + 5, f"descriptors grew: {baseline['fds']} -> {final['fds']}"
    max_db = max((s.get("db", 0) for s in samples), default=0)
    if "db" in baseline:
        assert final["db"] <= baseline["db"] + 2, (
            f"database connections grew: {baseline['db']} -> {final['db']}"
        )
        assert max_db <= 12, f"{max_db} database connections for one process of 8 threads"
    seen, runs = executions(record_dir)
    assert not DeadLetter.objects.filter(queue_name=queue).exists()
    assert w.stop() == 0
    figures.add(
        "5. soak (1 process x 8 threads, no-op)", case.name, messages=total, faults="none (leak check)",
        lost=len(sent - seen), duplicated=runs - len(seen),
        rss_mib=f"{baseline['rss'] / 1024:.1f}->{final['rss'] / 1024:.1f} (peak +{growth:.1%})",
        fds=f"{baseline['fds']}->{final['fds']}", db_connections_max=max_db if "db" in baseline else "-",
        msgs_per_s=round(total / run_seconds), enqueue_s=round(enqueue_seconds, 1),
    )  # fmt: skip

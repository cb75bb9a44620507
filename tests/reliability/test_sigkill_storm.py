"""Scenario 1, SIGKILL storm: 10,000 messages through 2 processes x 8 threads while a
chaos thread SIGKILLs a random worker process every second, ten times. No message may
be lost (every id runs at least once); duplicates are counted and reported."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from djqueue.models import DeadLetter
from tests.process import wait_for
from tests.reliability.conftest import executions
from tests.testapp.tasks import slow_record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]

MESSAGES = 10_000
KILLS = 10
# Each job sleeps this long (s), so 16 threads need several seconds for them all and the
# storm hits messages in flight rather than an empty queue.
JOB_SECONDS = 0.01


def chaos(workers, kills: int, interval: float, done: list[int], stop: threading.Event) -> None:
    """Every ``interval`` s SIGKILL a random worker process (waiting for one to exist)."""
    rng = random.Random()
    while len(done) < kills and not stop.wait(interval):
        children = wait_for(workers.children, timeout=60, message="a worker process to kill")
        victim = rng.choice(children)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
        done.append(victim)


def test_sigkill_storm_loses_no_message(case, queue, record_dir, workers, figures):
    broker = case.make()
    messages = [
        slow_record.message_with_options(args=(n, JOB_SECONDS), queue_name=queue) for n in range(MESSAGES)
    ]
    sent = {m.message_id for m in broker.enqueue_many(messages)}
    assert len(sent) == MESSAGES
    w = workers(
        case.url, "--processes", "2", "--threads", "8", "--queues", queue,
        broker_options=case.process_options(),
    )  # fmt: skip
    w.wait_children(2)
    wait_for(lambda: executions(record_dir)[1] >= 200, timeout=60, message="the first messages")
    killed: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=chaos, args=(w, KILLS, 1.0, killed, stop), daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        thread.join(120)
        assert len(killed) == KILLS, f"only {len(killed)} kills"
        done_during_storm = len(executions(record_dir)[0])
        assert done_during_storm < MESSAGES, "the storm came too late to hit messages in flight"
        wait_for(
            lambda: executions(record_dir)[0] >= sent, timeout=240, interval=0.5, message="every message"
        )
    finally:
        stop.set()
    elapsed = time.monotonic() - started
    seen, runs = executions(record_dir)
    lost = len(sent - seen)
    assert lost == 0
    dead = DeadLetter.objects.filter(queue_name=queue).count()
    assert dead == 0, "a message killed along with its worker was dead-lettered"
    assert w.stop() == 0
    assert w.output().count("exited with -9") >= KILLS
    figures.add(
        "1. SIGKILL storm (2 processes x 8 threads)", case.name, messages=MESSAGES,
        faults=f"{KILLS} x SIGKILL of a worker process, 1/s", lost=lost, duplicated=runs - len(seen),
        seconds=round(elapsed, 1), done_during_storm=done_during_storm,
    )  # fmt: skip

"""The producing side of one benchmark cell, run as its own process by the harness.

``python -m benchmarks.client --system djqueue --mode single --task noop --count 20000``
prints one JSON object: ``t0``/``t1`` (wall clock, s) around the sends and, for the
latency mode, the measured delays (ms) from send to actor start. ``--mode threads`` runs
the task's work in plain threads instead, with no queue, and times that.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

MODULES = {
    "djqueue": "benchmarks.djapp.tasks",
    "dramatiq": "benchmarks.peers.dramatiq_app",
    "dramatiq+django": "benchmarks.peers.dramatiq_django_app",
    "celery": "benchmarks.peers.celery_app",
    "django-tasks": "benchmarks.djapp.dt_tasks",
}


def load(system: str) -> Any:
    if system in ("djqueue", "django-tasks"):
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
        import django

        django.setup()
    return importlib.import_module(MODULES[system])


def run_latency(
    module: Any, count: int, gap_min: float, gap_max: float, warmup: int, budget: float
) -> list[float]:
    """Up to ``count`` delays (ms), stopping early once ``budget`` seconds have passed."""
    from benchmarks import work

    delays: list[float] = []
    deadline = None
    for i in range(warmup + count):
        if i == warmup:
            deadline = time.monotonic() + budget
        elif deadline is not None and time.monotonic() > deadline:
            break
        # A random pause leaves the worker idle and keeps sends out of step with any poll.
        time.sleep(random.uniform(gap_min, gap_max) / 1000)
        module.send("ping", time.time())
        popped = work._client.blpop([work.LATENCY_KEY], timeout=30)
        if popped is None:
            raise SystemExit(f"ping {i} was not processed within 30 s")
        if i >= warmup:
            delays.append(float(popped[1]))
    return delays


def send_all(module: Any, mode: str, name: str, count: int, chunk: int) -> None:
    """``count`` messages for the task ``name``: one ``send`` each, or in batches of ``chunk``."""
    if mode == "single":
        for _ in range(count):
            module.send(name)
        return
    done = 0
    while done < count:
        size = min(chunk, count - done)
        module.send_batch(name, size)
        done += size


class QueueDepth:
    """RabbitMQ: waits until the cell's queue holds a number of messages. A publish
    without confirms (Dramatiq's and Celery's default) returns once its frames are
    written, before RabbitMQ has taken the message; an enqueue is timed until it has.
    Elsewhere a send returns once the broker stored the message, and it waits for nothing."""

    def __init__(self, enabled: bool) -> None:
        self.channel: Any = None
        if enabled and os.environ.get("BENCH_BROKER") == "rabbitmq":
            import pika

            url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
            # Connected before the clock starts: the connection is the harness's, not a cost
            # of the system measured.
            self.channel = pika.BlockingConnection(pika.URLParameters(url)).channel()

    def wait(self, count: int) -> None:
        if self.channel is None:
            return
        from benchmarks import work

        while self.channel.queue_declare(work.QUEUE, passive=True).method.message_count < count:
            time.sleep(0.001)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.connection.close()


def run_threads(job: Callable[[], None], count: int, threads: int, stagger: float) -> None:
    """Run ``job`` ``count`` times in ``threads`` plain threads, no queue at all: what the
    job itself allows on this machine."""
    jobs: queue.SimpleQueue[None] = queue.SimpleQueue()
    for _ in range(count):
        jobs.put(None)

    def run(index: int) -> None:
        # Started a fraction of a job apart, as a worker's threads end up: threads that
        # start together call Redis together, and wait on one another every round.
        time.sleep(index * stagger / threads)
        while True:
            try:
                jobs.get_nowait()
            except queue.Empty:
                return
            job()

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", required=True, choices=sorted(MODULES))
    parser.add_argument("--mode", required=True, choices=["single", "batch", "latency", "threads"])
    parser.add_argument("--task", default="noop")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--chunk", type=int, default=1000, help="messages per batch call")
    parser.add_argument("--gap-min", type=float, default=10.0, help="latency: min pause (ms)")
    parser.add_argument("--gap-max", type=float, default=40.0, help="latency: max pause (ms)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8, help="threads mode: plain threads")
    parser.add_argument("--budget", type=float, default=1e9, help="latency: stop sampling after this (s)")
    parser.add_argument(
        "--until-held",
        action="store_true",
        help="time until the broker holds every message (no worker may be consuming)",
    )
    args = parser.parse_args(argv)

    out: dict[str, Any] = {}
    if args.mode == "threads":
        from benchmarks import work

        job = getattr(work, args.task)
        out["t0"] = time.time()
        run_threads(job, args.count, args.threads, stagger=work.IO_SLEEP)
        out["t1"] = time.time()
    else:
        module = load(args.system)
        if args.mode == "latency":
            out["delays"] = run_latency(
                module, args.count, args.gap_min, args.gap_max, args.warmup, args.budget
            )
        else:
            depth = QueueDepth(args.until_held)
            out["t0"] = time.time()
            send_all(module, args.mode, args.task, args.count, args.chunk)
            # Timed until the broker holds every message, not until the last call returned:
            # djqueue's RabbitMQ sends return before their publisher confirms arrive, and
            # the peers' (unconfirmed) ones before RabbitMQ has taken the message.
            module.flush()
            depth.wait(args.count)
            out["t1"] = time.time()
            depth.close()
        module.close()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

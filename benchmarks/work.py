"""The work every system's tasks do, so that all of them run exactly the same code.

Each task records its completion in Redis (a counter, and for latency the delay from
send to start), so the harness verifies that every message was processed instead of
assuming it. Configuration comes from the environment, set by the harness for both
the worker processes and the producing client:

- ``BENCH_REDIS_URL``: where the counters live (a Redis DB reserved for benchmarks)
- ``BENCH_KEY``: the key prefix of this cell (unique per run and cell)
- ``BENCH_QUEUE``: the queue name of this cell (unique per run and cell)
"""

from __future__ import annotations

import os
import time

import redis

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
KEY = os.environ.get("BENCH_KEY", "bench:dev")
QUEUE = os.environ.get("BENCH_QUEUE", "bench_dev")
COUNT_KEY = f"{KEY}:count"
LATENCY_KEY = f"{KEY}:latency"
IO_SLEEP = 0.05  # seconds: the I/O-bound job's simulated wait

# The latency client waits up to 30 s for a job (BLPOP): above redis-py's default
# 5 s socket timeout.
_client = redis.Redis.from_url(REDIS_URL, socket_timeout=60)


def noop() -> None:
    _client.incr(COUNT_KEY)


def sleepy() -> None:
    time.sleep(IO_SLEEP)
    _client.incr(COUNT_KEY)


def ping(sent_at: float) -> None:
    # Wall clock on both sides: producer and worker run on the same machine.
    started = time.time()
    _client.rpush(LATENCY_KEY, f"{(started - sent_at) * 1000:.4f}")

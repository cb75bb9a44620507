"""Actors for the rate-limit tests that run in real worker processes. Imported at the end
of tasks.py, so every worker process registers them."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from djqueue import actor
from djqueue.rate_limits import ConcurrentRateLimiter


@contextmanager
def _counted(path: str) -> Iterator[None]:
    """Count holders in ``path`` ("<now> <max>"), under an flock shared by all processes."""

    def update(delta: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.read(fd, 100).decode() or "0 0 0"
            now, most, entered = (int(v) for v in text.split())
            now += delta
            most = max(most, now)
            entered += delta > 0
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"{now} {most} {entered}".encode())
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    update(+1)
    try:
        yield
    finally:
        update(-1)


def read_counter(path: str) -> tuple[int, int, int]:
    """(holders now, most holders at once, entries so far)."""
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # not half-way through a writer's update
            text = f.read()
    except FileNotFoundError:
        return 0, 0, 0
    now, most, entered = (int(v) for v in (text or "0 0 0").split())
    return now, most, entered


@actor(actor_name="limited_section", max_retries=10_000, min_backoff=10, max_backoff=100)
def limited_section(key: str, counter: str, limit: int, hold_ms: int) -> None:
    # Over the limit, acquire() raises RateLimitExceeded and Retries tries again later.
    with ConcurrentRateLimiter(key, limit, ttl=60_000).acquire(), _counted(counter):
        time.sleep(hold_ms / 1000)

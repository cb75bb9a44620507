"""Actors used by the tests. They record each run by appending a line to a file, which
works across processes and needs no server (O_APPEND writes of a short line are atomic)."""

from __future__ import annotations

import os
import time

from djqueue import actor, get_current_message


def _record(value: object) -> None:
    directory = os.environ.get("DJQUEUE_TEST_RECORD_DIR")
    if not directory:
        return
    message = get_current_message()
    message_id = message.message_id if message is not None else "-"
    line = f"{message_id} {os.getpid()} {value}\n".encode()
    fd = os.open(os.path.join(directory, "executions.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@actor(actor_name="record", max_retries=3, min_backoff=50, max_backoff=200)
def record(value: object = None) -> object:
    _record(value)
    return value


@actor(actor_name="slow_record", max_retries=3, min_backoff=50, max_backoff=200)
def slow_record(value: object = None, seconds: float = 1.0) -> None:
    # Sleep in small steps so time limits and shutdown notifications can interrupt.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    _record(value)


@actor(actor_name="flaky", max_retries=5, min_backoff=20, max_backoff=100)
def flaky(value: object, fail_times: int) -> None:
    message = get_current_message()
    if message.retries < fail_times:
        raise RuntimeError(f"failing on purpose (attempt {message.retries + 1})")
    _record(value)


@actor(actor_name="always_fail", max_retries=2, min_backoff=20, max_backoff=50)
def always_fail(value: object = None) -> None:
    raise ValueError(f"always fails: {value}")


@actor(actor_name="fail_fast", throws=(KeyError,))
def fail_fast(value: object = None) -> None:
    raise KeyError(value)


# Further test actors, kept in modules of their own; imported here to be discovered.
from tests.testapp import tasks_limits, tasks_reliability  # noqa: E402,F401

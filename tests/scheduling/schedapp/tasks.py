"""Actors fired by the scheduler tests. Each run appends "message_id pid scheduled_at" to
$DJQUEUE_TEST_RECORD_DIR/executions.log (short O_APPEND writes are atomic across processes)."""

from __future__ import annotations

import os

from djqueue import actor, get_current_message


@actor(actor_name="sched.tick")
def tick(label: str = "") -> None:
    directory = os.environ.get("DJQUEUE_TEST_RECORD_DIR")
    message = get_current_message()
    if not directory or message is None:
        return
    line = f"{message.message_id} {os.getpid()} {message.options.get('scheduled_at')}\n".encode()
    fd = os.open(os.path.join(directory, "executions.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@actor
def report(day: str, *, verbose: bool = False) -> str:
    """Named by its dotted path, tests.scheduling.schedapp.tasks.report."""
    return day

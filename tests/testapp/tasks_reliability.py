"""Actors for the fault-injection suite (tests/reliability/). Imported at the end of
tasks.py, so every worker process registers them."""

from __future__ import annotations

import os
import signal

from djqueue import actor
from tests.testapp.tasks import _record


@actor(actor_name="crash_loop", max_retries=0)
def crash_loop(how: str = "exit") -> None:
    """Kill the process running it, every time: a job that segfaults or is OOM-killed.

    The attempt is recorded first, so a test can count how often it ran.
    """
    _record(f"crash-{how}")
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


@actor(actor_name="noop", max_retries=0)
def noop() -> None:
    """Does nothing, recording only its message id: for soak runs of many messages."""
    _record("")

"""An actor outside the app's tasks module: only a crontab entry's dotted path names it."""

from __future__ import annotations

from djqueue import actor


@actor(queue_name="cleanup")
def cleanup() -> None: ...

"""Middleware for tests that need a worker process to behave in a particular way."""

from __future__ import annotations

import os
import time
from typing import Any

from djqueue import Middleware


class SlowBoot(Middleware):
    """Delays a worker process's boot by ``DJQUEUE_TEST_SLOW_BOOT`` seconds, as a slow
    broker or an application warming its caches would."""

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        time.sleep(float(os.environ["DJQUEUE_TEST_SLOW_BOOT"]))

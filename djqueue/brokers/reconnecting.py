"""How a consumer waits out a broker it cannot reach: the same on every broker.

Each failed attempt is one WARNING line naming the queue, the broker (its password
masked, as ``Broker.describe()`` gives it), the attempt and when the next one comes; the
traceback is logged only at DEBUG, or at ERROR for an error that is not a lost
connection. The delay starts at 0.1 s and doubles up to a limit. The worker's consumer
threads use it for a consumer that raised (Redis); the RabbitMQ and database consumers,
which reconnect in place, use it from inside.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Broker

FIRST_DELAY = 0.1  # s
MAX_DELAY = 10.0  # s


class Reconnecting:
    """Backoff and log lines for the attempts of one consumer of ``queue_name``."""

    def __init__(
        self, broker: Broker, queue_name: str, logger: logging.Logger, *, limit: float = MAX_DELAY
    ) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.logger = logger
        self.limit = limit
        self.failures = 0
        self.delay = FIRST_DELAY

    def failed(self, error: BaseException, *, expected: bool = True) -> float:
        """Log a failed attempt; the seconds to wait before the next one. ``expected``:
        the broker could not be reached (no traceback unless at DEBUG)."""
        delay = self.delay
        self.failures += 1
        self.delay = min(delay * 2, self.limit)
        message = "cannot consume %r from %s, trying again in %.1f s (attempt %d): %s"
        args = (self.queue_name, self.broker.describe(), delay, self.failures, str(error) or repr(error))
        if expected:
            self.logger.warning(message, *args, exc_info=self.logger.isEnabledFor(logging.DEBUG))
        else:
            self.logger.error(message, *args, exc_info=True)
        return delay

    def succeeded(self) -> None:
        """The broker answered: log the recovery (if there were failures) and start over."""
        if self.failures:
            self.logger.info(
                "consuming %r from %s again after %d failed attempt(s)",
                self.queue_name,
                self.broker.describe(),
                self.failures,
            )
            self.failures = 0
            self.delay = FIRST_DELAY

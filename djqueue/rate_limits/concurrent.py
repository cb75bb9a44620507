"""ConcurrentRateLimiter: at most N holders at once (a distributed semaphore; N=1 is a mutex)."""

from __future__ import annotations

import uuid

from .base import RateLimitBackend, RateLimiter, positive_int

DEFAULT_TTL = 900_000


class ConcurrentRateLimiter(RateLimiter):
    """Lets at most ``limit`` blocks run at once for ``key``, across every worker.

    Each admitted holder takes a slot that it gives back when the ``with`` block ends.
    A slot also frees itself ``ttl`` ms (default 15 minutes) after it was taken, so a
    worker killed while holding one cannot block the key for ever; set ``ttl`` above the
    longest time the block can run, or a slow holder's slot is given to another.

        limiter = ConcurrentRateLimiter("legacy-erp", limit=2, ttl=60_000)
        with limiter.acquire():
            call_the_erp()
    """

    kind = "concurrent"

    def __init__(
        self, key: str, limit: int = 1, *, ttl: int = DEFAULT_TTL, backend: RateLimitBackend | None = None
    ) -> None:
        super().__init__(key, limit, backend=backend)
        self.ttl = positive_int("ttl", ttl)

    def _acquire(self) -> str | None:
        token = uuid.uuid4().hex
        if self.backend.semaphore_acquire(self.backend_key, token, limit=self.limit, ttl=self.ttl):
            return token
        return None

    def _release(self, handle: str) -> None:
        self.backend.semaphore_release(self.backend_key, handle)

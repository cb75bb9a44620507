"""WindowRateLimiter: at most ``limit`` admissions in any sliding ``window`` of ms."""

from __future__ import annotations

import uuid

from .base import RateLimitBackend, RateLimiter, positive_int


class WindowRateLimiter(RateLimiter):
    """Admits at most ``limit`` callers in any ``window`` ms, measured from now backwards.

    Unlike a fixed window, there is no edge at which twice the limit gets through. The
    store keeps the time of each admission still inside the window (up to ``limit`` of
    them per key), so very large limits are cheaper with the Redis backend.

        limiter = WindowRateLimiter("partner-api", limit=100, window=60_000)  # 100/minute
        with limiter.acquire():
            call_partner()
    """

    kind = "window"

    def __init__(
        self, key: str, limit: int = 1, *, window: int = 1000, backend: RateLimitBackend | None = None
    ) -> None:
        super().__init__(key, limit, backend=backend)
        self.window = positive_int("window", window)

    def _acquire(self) -> bool:
        return self.backend.window_add(
            self.backend_key, uuid.uuid4().hex, limit=self.limit, window=self.window
        )

"""BucketRateLimiter: a token bucket, ``limit`` calls per ``bucket`` ms with bursts."""

from __future__ import annotations

from .base import RateLimitBackend, RateLimiter, positive_int


class BucketRateLimiter(RateLimiter):
    """A token bucket of ``limit`` tokens that refills at ``limit`` tokens per ``bucket`` ms.

    A quiet key can take a burst of ``limit`` calls at once; after that calls are let in
    as tokens come back, ``limit`` per ``bucket`` ms on average. Nothing is released when
    the ``with`` block ends: a token, once taken, is spent.

        limiter = BucketRateLimiter("sms-provider", limit=10, bucket=1_000)  # 10/s
        with limiter.acquire():
            send_sms()
    """

    kind = "bucket"

    def __init__(
        self, key: str, limit: int = 1, *, bucket: int = 1000, backend: RateLimitBackend | None = None
    ) -> None:
        super().__init__(key, limit, backend=backend)
        self.bucket = positive_int("bucket", bucket)

    def _acquire(self) -> bool:
        return self.backend.bucket_take(self.backend_key, limit=self.limit, interval=self.bucket)

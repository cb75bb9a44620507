"""Rate limiters: ``with limiter.acquire():`` runs a block only within the limit.

- ``ConcurrentRateLimiter(key, limit, ttl=ms)``: at most ``limit`` blocks at once.
- ``BucketRateLimiter(key, limit, bucket=ms)``: a token bucket, ``limit`` per ``bucket`` ms.
- ``WindowRateLimiter(key, limit, window=ms)``: at most ``limit`` in any sliding window.

Over the limit, ``acquire()`` raises ``djqueue.RateLimitExceeded``, which the Retries
middleware retries with backoff. The state lives in ``DJQUEUE["RATE_LIMIT_BACKEND"]``:
``"db"``, ``"memory"`` or a ``redis://`` URL (default: Redis when the broker is Redis,
else the database).
"""

from __future__ import annotations

from ..errors import RateLimitExceeded
from .backends import get_backend, set_backend
from .base import RateLimitBackend, RateLimiter
from .bucket import BucketRateLimiter
from .concurrent import ConcurrentRateLimiter
from .window import WindowRateLimiter

__all__ = [
    "BucketRateLimiter",
    "ConcurrentRateLimiter",
    "RateLimitBackend",
    "RateLimitExceeded",
    "RateLimiter",
    "WindowRateLimiter",
    "get_backend",
    "set_backend",
]

"""The rate-limiter base class and the interface of the stores behind it.

Limiters (concurrent.py, bucket.py, window.py) decide nothing themselves: each one asks
its backend for one atomic operation, so that every worker thread and every process
sharing a store sees the same limit. Backends also keep the keys of unique jobs
(middleware/unique.py), since both need the same kind of shared, expiring state.

All times are in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigurationError, RateLimitExceeded


class RateLimitBackend:
    """Shared, expiring state for rate limiters and unique-job keys.

    Every method is one atomic step: two callers anywhere (threads, processes, hosts)
    never both see the same free slot. Keys arrive already prefixed by their limiter
    kind (``concurrent:``, ``bucket:``, ``window:``, ``unique:``); a backend may add a
    namespace of its own. Times are in ms.

    Methods subclasses must implement:

    - ``semaphore_acquire(key, token, *, limit, ttl) -> bool``: take one of ``limit``
      slots under ``token``; the slot frees itself ``ttl`` ms later if not released.
    - ``semaphore_release(key, token)``: give the slot held under ``token`` back.
    - ``bucket_take(key, *, limit, interval) -> bool``: take a token from a bucket that
      holds ``limit`` tokens and refills ``limit`` tokens every ``interval`` ms.
    - ``window_add(key, token, *, limit, window) -> bool``: admit the caller if fewer than
      ``limit`` were admitted in the last ``window`` ms.
    - ``unique_claim(key, owner, *, ttl) -> bool``: hold ``key`` for ``owner`` (a message
      id) for ``ttl`` ms, if it is free, expired, or already held by ``owner``.
    - ``unique_holder(key) -> str | None``: the owner holding ``key`` now.
    - ``unique_release(key, owner) -> bool``: free ``key`` if ``owner`` still holds it.
    - ``unique_release_owner(owner) -> bool``: free whatever key ``owner`` holds (used
      when a message is cancelled, and only its id is known).
    """

    name = ""

    def semaphore_acquire(self, key: str, token: str, *, limit: int, ttl: int) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement semaphore_acquire()")

    def semaphore_release(self, key: str, token: str) -> None:
        raise NotImplementedError("subclasses of RateLimitBackend must implement semaphore_release()")

    def bucket_take(self, key: str, *, limit: int, interval: int) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement bucket_take()")

    def window_add(self, key: str, token: str, *, limit: int, window: int) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement window_add()")

    def unique_claim(self, key: str, owner: str, *, ttl: int) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement unique_claim()")

    def unique_holder(self, key: str) -> str | None:
        raise NotImplementedError("subclasses of RateLimitBackend must implement unique_holder()")

    def unique_release(self, key: str, owner: str) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement unique_release()")

    def unique_release_owner(self, owner: str) -> bool:
        raise NotImplementedError("subclasses of RateLimitBackend must implement unique_release_owner()")

    def close(self) -> None:
        """Release connections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive whole number, not {value!r}")
    return value


class RateLimiter:
    """Base of the limiters: ``with limiter.acquire():`` runs the block if admitted.

    ``key`` names what is limited ("stripe-api", f"user-{user.pk}"); limiters of different
    kinds may use the same key without clashing. ``backend`` defaults to the store named
    by ``DJQUEUE["RATE_LIMIT_BACKEND"]``.
    """

    kind = ""

    def __init__(self, key: str, limit: int, *, backend: RateLimitBackend | None = None) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"a rate limiter key must be a non-empty string, not {key!r}")
        self.key = key
        self.limit = positive_int("limit", limit)
        self._backend = backend

    @property
    def backend(self) -> RateLimitBackend:
        if self._backend is not None:
            return self._backend
        from .backends import get_backend

        return get_backend()

    @property
    def backend_key(self) -> str:
        return f"{self.kind}:{self.key}"

    def _acquire(self) -> Any:
        """Try to get in; return a truthy handle passed to ``_release``, or a falsy value."""
        raise NotImplementedError(f"subclasses of RateLimiter must implement _acquire() ({type(self)})")

    def _release(self, handle: Any) -> None:
        """Undo ``_acquire`` when the block ends (only the concurrent limiter does)."""

    @contextmanager
    def acquire(self, *, raise_on_failure: bool = True) -> Iterator[bool]:
        """Run the ``with`` block if admitted.

        When the limit is reached, raise ``RateLimitExceeded`` (inside an actor the
        Retries middleware retries the message with backoff), or, with
        ``raise_on_failure=False``, run the block anyway with ``False`` as the value of
        ``with ... as acquired`` so the caller can decide.
        """
        handle = self._acquire()
        if not handle and raise_on_failure:
            raise RateLimitExceeded(
                f"{type(self).__name__} {self.key!r} is at its limit of {self.limit}; try again later"
            )
        try:
            yield bool(handle)
        finally:
            if handle:
                self._release(handle)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, limit={self.limit})"

"""The base of the backends that store each key's state and change it with the pure
transitions of rate_limits/state.py: memory and database. (Redis runs the same rules in
Lua, one script per operation, so it derives from RateLimitBackend directly.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import state
from ..base import RateLimitBackend

# A transition bound to its arguments: (stored state or None, now in ms) -> Transition.
Step = Callable[[Any, int], state.Transition]


class TransitionBackend(RateLimitBackend):
    """The limiter operations of RateLimitBackend as transitions of rate_limits/state.py.

    Methods subclasses must implement: ``apply_transition(key, step) -> bool``, which
    reads the key's state (None if there is none or it expired), calls ``step(state,
    now)``, stores the new state until the ``expires_at`` it returns and returns whether
    the caller was admitted, all as one atomic step; and the ``unique_*`` methods.
    """

    def apply_transition(self, key: str, step: Step) -> bool:
        raise NotImplementedError("subclasses of TransitionBackend must implement apply_transition()")

    def semaphore_acquire(self, key: str, token: str, *, limit: int, ttl: int) -> bool:
        return self.apply_transition(key, lambda s, now: state.semaphore_acquire(s, now, token, limit, ttl))

    def semaphore_release(self, key: str, token: str) -> None:
        self.apply_transition(key, lambda s, now: state.semaphore_release(s, now, token))

    def bucket_take(self, key: str, *, limit: int, interval: int) -> bool:
        return self.apply_transition(key, lambda s, now: state.bucket_take(s, now, limit, interval))

    def window_add(self, key: str, token: str, *, limit: int, window: int) -> bool:
        return self.apply_transition(key, lambda s, now: state.window_add(s, now, limit, window))

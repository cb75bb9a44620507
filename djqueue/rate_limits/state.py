"""Rate-limit state transitions as pure functions, shared by the memory and database backends
(through backends/transitions.py).

Each function takes the stored state (None when there is none yet) and the time ``now``
(ms since the epoch) and returns ``(admitted, new_state, expires_at)``: whether the caller
was let in, the JSON-serialisable state to store, and when that state stops mattering (ms
since the epoch), after which a backend may forget the key. The Redis backend implements
the same rules in Lua (backends/redis.py), so all three backends agree.
"""

from __future__ import annotations

import math
from typing import Any

Transition = tuple[bool, Any, int]


def semaphore_acquire(state: dict[str, int] | None, now: int, token: str, limit: int, ttl: int) -> Transition:
    """Take one of ``limit`` slots, each held until released or until ``ttl`` ms pass.

    State: {token: expires_at}. A slot whose holder died without releasing it frees
    itself when it expires, so a SIGKILLed worker cannot block a key for ever.
    """
    slots = {t: expires for t, expires in (state or {}).items() if expires > now}
    admitted = len(slots) < limit
    if admitted:
        slots[token] = now + ttl
    return admitted, slots, max(slots.values(), default=now)


def semaphore_release(state: dict[str, int] | None, now: int, token: str) -> Transition:
    slots = {t: expires for t, expires in (state or {}).items() if expires > now and t != token}
    return True, slots, max(slots.values(), default=now)


def bucket_take(state: dict[str, float] | None, now: int, limit: int, interval: int) -> Transition:
    """A token bucket holding at most ``limit`` tokens that refills ``limit`` tokens every
    ``interval`` ms: bursts of up to ``limit``, and ``limit`` per ``interval`` on average.

    State: {"tokens": float, "at": ms of the last update}.
    """
    rate = limit / interval  # tokens per ms
    tokens = float(limit)
    if state:
        # max(0, ...): a clock that stepped back must not drain the bucket.
        tokens = min(float(limit), state["tokens"] + max(0, now - state["at"]) * rate)
    admitted = tokens >= 1
    if admitted:
        tokens -= 1
    full_at = now + math.ceil((limit - tokens) / rate)
    return admitted, {"tokens": tokens, "at": now}, full_at


def window_add(state: list[int] | None, now: int, limit: int, window: int) -> Transition:
    """A sliding window: at most ``limit`` admissions in any ``window`` ms.

    State: the times of the admissions of the last ``window`` ms (at most ``limit`` of them).
    """
    hits = [t for t in (state or []) if t > now - window]
    admitted = len(hits) < limit
    if admitted:
        hits.append(now)
    return admitted, hits, max(hits, default=now) + window

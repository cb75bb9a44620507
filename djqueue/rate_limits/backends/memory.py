"""An in-process backend for tests: thread-safe, shared by the threads of one process only."""

from __future__ import annotations

import threading
from typing import Any

from ...message import current_millis
from .transitions import Step, TransitionBackend


class MemoryBackend(TransitionBackend):
    """Keeps every key in a dict behind one lock. ``"memory"`` in RATE_LIMIT_BACKEND."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple[Any, int]] = {}  # key -> (state, expires_at)
        self._unique: dict[str, tuple[str, int]] = {}  # key -> (owner, expires_at)
        self._sweep_at = 10_000

    def apply_transition(self, key: str, step: Step) -> bool:
        with self._lock:
            now = current_millis()
            stored = self._states.get(key)
            current = stored[0] if stored is not None and stored[1] > now else None
            admitted, new_state, expires_at = step(current, now)
            self._states[key] = (new_state, expires_at)
            if len(self._states) > self._sweep_at:
                # Forget expired keys; sweep again only once the dict has doubled.
                self._states = {k: v for k, v in self._states.items() if v[1] > now}
                self._sweep_at = max(10_000, 2 * len(self._states))
            return admitted

    def unique_claim(self, key: str, owner: str, *, ttl: int) -> bool:
        with self._lock:
            now = current_millis()
            held = self._unique.get(key)
            if held is not None and held[1] > now and held[0] != owner:
                return False
            self._unique[key] = (owner, now + ttl)
            return True

    def unique_holder(self, key: str) -> str | None:
        with self._lock:
            held = self._unique.get(key)
            return held[0] if held is not None and held[1] > current_millis() else None

    def unique_release(self, key: str, owner: str) -> bool:
        with self._lock:
            held = self._unique.get(key)
            if held is None or held[0] != owner:
                return False
            del self._unique[key]
            return held[1] > current_millis()

    def unique_release_owner(self, owner: str) -> bool:
        with self._lock:
            keys = [key for key, (holder, _) in self._unique.items() if holder == owner]
            for key in keys:
                del self._unique[key]
            return bool(keys)

"""A database backend: one row per key, changed atomically, on SQLite and PostgreSQL.

Rate limits: each operation runs in its own transaction that first inserts the key's
row if missing (``INSERT ... ON CONFLICT DO NOTHING``) and then locks it with
``SELECT ... FOR UPDATE``. On PostgreSQL the row lock serialises the callers of one key;
on SQLite the insert, being a write, takes the database's write lock at once, so the
read-modify-write that follows cannot interleave with another one even in SQLite's
default deferred transactions. The new state is computed by the pure functions of
rate_limits/state.py.

Unique keys need no explicit lock: a claim is one conditional UPDATE (the key is free,
expired, or already ours) or, if there is no row yet, one INSERT that the primary key
makes fail for everyone but the first caller.

Call limiters outside ``transaction.atomic()`` on the same database: inside one, the
row stays locked (and a new slot invisible to others) until that transaction ends.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q

from ...message import current_millis
from .transitions import Step, TransitionBackend

# Rows that expired this long ago are deleted, every CLEANUP_EVERY operations.
CLEANUP_GRACE = 60_000
CLEANUP_EVERY = 500
MAX_KEY_LENGTH = 255


def _row_key(key: str) -> str:
    # Keys longer than the column are stored by digest: still one row per key.
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return key[:150] + "#" + hashlib.sha256(key.encode()).hexdigest()


class DatabaseBackend(TransitionBackend):
    """Rate limits and unique keys as rows of the database ``using``. ``"db"`` in
    RATE_LIMIT_BACKEND (the broker's database for ``db://ALIAS``, else ``default``)."""

    name = "db"

    def __init__(self, *, using: str = "default") -> None:
        self.using = using
        self._operations = 0
        self._count_lock = threading.Lock()

    def _models(self) -> tuple[Any, Any]:
        from ...models import RateLimitState, UniqueJobKey

        return RateLimitState, UniqueJobKey

    def _maybe_cleanup(self) -> None:
        with self._count_lock:
            self._operations += 1
            due = self._operations % CLEANUP_EVERY == 0
        if due:
            self.delete_expired()

    def delete_expired(self, *, grace: int = CLEANUP_GRACE) -> int:
        """Delete the rows that stopped mattering ``grace`` ms ago; returns how many."""
        RateLimitState, UniqueJobKey = self._models()
        before = current_millis() - grace
        deleted, _ = RateLimitState.objects.using(self.using).filter(expires_at__lt=before).delete()
        more, _ = UniqueJobKey.objects.using(self.using).filter(expires_at__lt=before).delete()
        return deleted + more

    def apply_transition(self, key: str, step: Step) -> bool:
        RateLimitState, _ = self._models()
        rows = RateLimitState.objects.using(self.using)
        key = _row_key(key)
        self._maybe_cleanup()
        # A cleanup may delete the row between our insert and our lock: insert again.
        for _ in range(3):
            with transaction.atomic(using=self.using):
                rows.bulk_create([RateLimitState(key=key, state=None, expires_at=0)], ignore_conflicts=True)
                row = rows.select_for_update().filter(key=key).first()
                if row is None:
                    continue
                now = current_millis()
                current = row.state if row.expires_at > now else None
                admitted, row.state, row.expires_at = step(current, now)
                row.save(update_fields=["state", "expires_at"])
                return admitted
        raise RuntimeError(f"rate-limit row {key!r} kept disappearing")  # pragma: no cover

    def unique_claim(self, key: str, owner: str, *, ttl: int) -> bool:
        _, UniqueJobKey = self._models()
        rows = UniqueJobKey.objects.using(self.using)
        key = _row_key(key)
        self._maybe_cleanup()
        for _ in range(2):
            now = current_millis()
            free_or_ours = Q(message_id=owner) | Q(expires_at__lte=now)
            if rows.filter(free_or_ours, key=key).update(message_id=owner, expires_at=now + ttl):
                return True
            try:
                with transaction.atomic(using=self.using):
                    rows.create(key=key, message_id=owner, expires_at=now + ttl)
                return True
            except IntegrityError:
                # Held by another message, or it expired in between: look once more.
                continue
        return False

    def unique_holder(self, key: str) -> str | None:
        _, UniqueJobKey = self._models()
        rows = UniqueJobKey.objects.using(self.using)
        row = rows.filter(key=_row_key(key), expires_at__gt=current_millis()).first()
        return row.message_id if row is not None else None

    def unique_release(self, key: str, owner: str) -> bool:
        _, UniqueJobKey = self._models()
        rows = UniqueJobKey.objects.using(self.using)
        deleted, _ = rows.filter(key=_row_key(key), message_id=owner).delete()
        return bool(deleted)

    def unique_release_owner(self, owner: str) -> bool:
        _, UniqueJobKey = self._models()
        deleted, _ = UniqueJobKey.objects.using(self.using).filter(message_id=owner).delete()
        return bool(deleted)

    def __repr__(self) -> str:
        return f"DatabaseBackend(using={self.using!r})"

"""Rate-limit backends, and the process-wide one that DJQUEUE["RATE_LIMIT_BACKEND"] names.

- ``"db"``: rows in the Django database (the broker's database when the broker is
  ``db://ALIAS``, else ``default``); SQLite and PostgreSQL.
- a ``redis://`` or ``rediss://`` URL: Redis, with one Lua script per operation.
- ``"memory"``: this process only, for tests.
- unset: the broker's Redis when the broker is Redis, else ``"db"``.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from ...errors import ConfigurationError
from ..base import RateLimitBackend

__all__ = ["RateLimitBackend", "backend_from_setting", "get_backend", "set_backend"]

_backend: RateLimitBackend | None = None
_lock = threading.Lock()


def backend_from_setting(
    value: str | None, broker_url: str, broker_options: dict[str, Any] | None = None
) -> RateLimitBackend:
    """The backend that a RATE_LIMIT_BACKEND value names, given the broker's URL."""
    broker_options = broker_options or {}
    if value is None:
        value = broker_url if broker_url.startswith(("redis://", "rediss://")) else "db"
    if value == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    if value == "db":
        from .database import DatabaseBackend

        alias = urlsplit(broker_url).netloc if broker_url.startswith("db://") else ""
        return DatabaseBackend(using=alias or "default")
    if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
        from .redis import RedisBackend

        namespace = broker_options.get("namespace") if value == broker_url else None
        return RedisBackend.from_url(value, namespace=f"{namespace}:" if namespace else "djqueue:")
    raise ConfigurationError(
        f"DJQUEUE['RATE_LIMIT_BACKEND'] must be 'db', 'memory' or a redis:// URL, not {value!r}"
    )


def get_backend() -> RateLimitBackend:
    """The process-wide backend, built from the DJQUEUE settings on first use."""
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                from ... import conf

                _backend = backend_from_setting(
                    conf.get("RATE_LIMIT_BACKEND"), conf.get("BROKER_URL"), conf.get("BROKER_OPTIONS")
                )
    return _backend


def set_backend(backend: RateLimitBackend | None) -> RateLimitBackend | None:
    """Make ``backend`` the process-wide one (None: rebuild from settings on next use)."""
    global _backend
    with _lock:
        previous, _backend = _backend, backend
    if previous is not None and previous is not backend:
        previous.close()
    return backend


def _reset_on_setting_change(setting: str, **kwargs: Any) -> None:
    # override_settings(DJQUEUE=...) in tests must not keep using the old store.
    if setting == "DJQUEUE":
        set_backend(None)


def _connect_signal() -> None:
    from django.core.signals import setting_changed

    setting_changed.connect(_reset_on_setting_change, dispatch_uid="djqueue.rate_limits.reset")


_connect_signal()

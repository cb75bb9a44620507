"""Results backends, and the process-wide current one.

``DJQUEUE["RESULT_BACKEND"]`` is ``"db"`` (TaskResult rows, the default) or a
``redis://`` / ``rediss://`` URL; ``DJQUEUE["RESULT_TTL"]`` (ms, default 24 h) is how
long a result is kept.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from ..errors import ConfigurationError
from .base import ResultBackend, StoredResult

__all__ = [
    "ResultBackend",
    "StoredResult",
    "backend_from_setting",
    "get_result_backend",
    "set_result_backend",
]

_backend: ResultBackend | None = None
_lock = threading.Lock()


def backend_from_setting(value: str, *, ttl: int) -> ResultBackend:
    """The backend that a RESULT_BACKEND value names."""
    if value == "db":
        from .database import DatabaseResultBackend

        return DatabaseResultBackend(ttl=ttl)
    if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
        from .redis import RedisResultBackend

        return RedisResultBackend(value, ttl=ttl)
    raise ConfigurationError(f"DJQUEUE['RESULT_BACKEND'] must be 'db' or a redis:// URL, not {value!r}")


def get_result_backend() -> ResultBackend:
    """The current results backend, built from the DJQUEUE settings on first use."""
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                from .. import conf

                _backend = backend_from_setting(conf.get("RESULT_BACKEND"), ttl=conf.get("RESULT_TTL"))
    return _backend


def set_result_backend(backend: ResultBackend | None) -> ResultBackend | None:
    """Make ``backend`` the current one (None: rebuild from settings on next use)."""
    global _backend
    _backend = backend
    return backend


@receiver(setting_changed)
def _reset_on_setting_change(setting: str, **kwargs: Any) -> None:
    # override_settings(DJQUEUE=...) in tests must not keep a backend built from the old value.
    if setting == "DJQUEUE":
        set_result_backend(None)

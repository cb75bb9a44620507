"""The DJQUEUE setting: defaults, and building the broker it describes.

``settings.DJQUEUE`` is optional and, when given, a dict; every key has a default.
Without ``BROKER_URL`` the ``DJQUEUE_BROKER_URL`` environment variable is read (from
``os.environ``: it is not a Django setting), and without that the Django database is the
broker (``db://default``). Times are in milliseconds.

Nothing else is read: a ``DJQUEUE`` that is not a dict, and settings named ``DJQUEUE_*``,
are ignored here and reported by the system checks (djqueue.E006, djqueue.W004).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.signals import setting_changed

if TYPE_CHECKING:
    from .brokers.base import Broker

DEFAULT_BROKER_URL = "db://default"
# The one DJQUEUE_* environment variable djqueue reads.
BROKER_URL_ENV = "DJQUEUE_BROKER_URL"

DEFAULTS: dict[str, Any] = {
    "BROKER_URL": None,
    "BROKER_OPTIONS": {},
    "MIDDLEWARE": None,
    "RESULT_BACKEND": "db",
    "RESULT_TTL": 24 * 3600 * 1000,
    "TASKS_MODULE": "tasks",
    "ENCODER": "json",
    "CRONTABS": {},
    "RATE_LIMIT_BACKEND": None,
    "ENQUEUE_ON_COMMIT": False,
    "MAX_MESSAGE_SIZE": 1024 * 1024,
    "DEAD_LETTER_TTL": 7 * 24 * 3600 * 1000,
    "MAX_DELIVERIES": 5,
    "SHUTDOWN_TIMEOUT": 30_000,
}


def user_settings() -> dict[str, Any]:
    """``settings.DJQUEUE``, or ``{}`` if it is missing or not a dict."""
    value = getattr(settings, "DJQUEUE", None)
    return value if isinstance(value, dict) else {}


def get(name: str) -> Any:
    """One DJQUEUE setting, or its default."""
    value = user_settings().get(name, DEFAULTS[name])
    if name == "BROKER_URL" and not value:
        value = os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
    return value


_cache: dict[str, Any] = {}


def get_cached(name: str) -> Any:
    """``get(name)``, read from the settings once: for values read on every send.

    The cache is emptied when ``settings.DJQUEUE`` changes through ``override_settings``
    (the ``setting_changed`` signal); settings changed by other means are not seen.
    """
    try:
        return _cache[name]
    except KeyError:
        value = _cache[name] = get(name)
        return value


def _clear_cache(*, setting: str, **kwargs: Any) -> None:
    if setting == "DJQUEUE":
        _cache.clear()


setting_changed.connect(_clear_cache, dispatch_uid="djqueue.conf.clear_cache")


def build_middleware() -> list[Any] | None:
    from .middleware import load_middleware

    paths = get("MIDDLEWARE")
    if paths is None:
        return None
    return [load_middleware(path) if isinstance(path, str) else path for path in paths]


def build_broker() -> Broker:
    """The broker the settings describe, with its middleware stack."""
    from .brokers import broker_from_url
    from .encoder import get_encoder, set_encoder

    encoder = get("ENCODER")
    if isinstance(encoder, str) and encoder != get_encoder().name:
        set_encoder(encoder)
    options = dict(get("BROKER_OPTIONS"))
    options.setdefault("max_message_size", get("MAX_MESSAGE_SIZE"))
    return broker_from_url(get("BROKER_URL"), middleware=build_middleware(), **options)

"""Brokers, and the process-wide current broker."""

from __future__ import annotations

import threading
from importlib import import_module
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import ConfigurationError
from .base import Broker, Consumer, MessageProxy, QueueStats

__all__ = [
    "BROKER_CLASSES",
    "Broker",
    "Consumer",
    "MessageProxy",
    "QueueStats",
    "broker_from_url",
    "cancel",
    "get_broker",
    "mask_url",
    "set_broker",
]

# scheme -> "module:Class"; imported lazily so a broker's client library is only
# needed by those who use that broker.
BROKER_CLASSES = {
    "stub": "djqueue.brokers.stub:StubBroker",
    "db": "djqueue.brokers.database:DatabaseBroker",
    "redis": "djqueue.brokers.redis:RedisBroker",
    "rediss": "djqueue.brokers.redis:RedisBroker",
    "amqp": "djqueue.brokers.rabbitmq:RabbitmqBroker",
    "amqps": "djqueue.brokers.rabbitmq:RabbitmqBroker",
}

_broker: Broker | None = None
_lock = threading.Lock()


# Query parameters whose value is masked too: redis-py takes ``?password=`` (and TLS
# key passwords) from the query string as well as from the user information.
_SECRET_PARAMETERS = ("password", "passwd", "secret", "token")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, banners and errors."""
    masked = []
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
        except ValueError:
            masked.append("<unparseable URL>")
            continue
        if parts.password:
            netloc = parts.netloc.rsplit("@", 1)[1]
            user = parts.username or ""
            parts = parts._replace(netloc=f"{user}:***@{netloc}")
        if parts.query:
            parts = parts._replace(query="&".join(map(_mask_parameter, parts.query.split("&"))))
        masked.append(urlunsplit(parts))
    return ";".join(masked)


def _mask_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    if equals and any(word in unquote(name).lower() for word in _SECRET_PARAMETERS):
        return f"{name}=***"
    return parameter


def broker_class_for(url: str) -> type[Broker]:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        path = BROKER_CLASSES[scheme]
    except KeyError:
        raise ConfigurationError(
            f"unknown broker URL scheme {scheme!r} in {mask_url(url)!r}; "
            f"use one of {', '.join(s + '://' for s in BROKER_CLASSES)}"
        ) from None
    module_name, class_name = path.split(":")
    return getattr(import_module(module_name), class_name)


def broker_from_url(url: str, **options: Any) -> Broker:
    """Build the broker a URL names, e.g. ``redis://localhost:6379/0``."""
    return broker_class_for(url).from_url(url, **options)  # type: ignore[attr-defined]


def get_broker() -> Broker:
    """The current broker, built from the DJQUEUE settings on first use."""
    global _broker
    if _broker is None:
        with _lock:
            if _broker is None:
                from ..conf import build_broker

                _broker = build_broker()
    return _broker


def set_broker(broker: Broker | None) -> Broker | None:
    """Make ``broker`` the current one (None: rebuild from settings on next use)."""
    global _broker
    _broker = broker
    return broker


def cancel(message_id: str, *, queue_name: str | None = None) -> bool:
    """Remove a queued or delayed message from the current broker before it starts, and
    free its unique key; True if it was found. ``queue_name`` narrows the search."""
    from ..middleware.unique import cancel_message

    return cancel_message(get_broker(), message_id, queue_name)

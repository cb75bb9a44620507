"""djqueue: background jobs for Django.

Decorate functions with ``@actor`` in an app's ``tasks.py``, call ``.send()``, and run
``python manage.py runworkers``.
"""

from __future__ import annotations

from .actor import Actor, actor
from .brokers import cancel, get_broker, set_broker
from .brokers.base import Broker, Consumer, MessageProxy, QueueStats
from .composition import group, pipeline
from .errors import (
    ActorNotFound,
    BrokerError,
    ConfigurationError,
    DecodeError,
    DjqueueError,
    MessageTooLarge,
    RateLimitExceeded,
    ResultError,
    ResultFailure,
    ResultMissing,
    ResultTimeout,
    Retry,
    SkipMessage,
    TimeLimitExceeded,
)
from .message import Message
from .middleware import Middleware
from .middleware.current_message import get_current_message
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorNotFound",
    "Broker",
    "BrokerError",
    "ConfigurationError",
    "Consumer",
    "DecodeError",
    "DjqueueError",
    "Message",
    "MessageProxy",
    "MessageTooLarge",
    "Middleware",
    "QueueStats",
    "RateLimitExceeded",
    "ResultError",
    "ResultFailure",
    "ResultMissing",
    "ResultTimeout",
    "Retry",
    "SkipMessage",
    "TimeLimitExceeded",
    "Worker",
    "actor",
    "cancel",
    "get_broker",
    "get_current_message",
    "group",
    "pipeline",
    "set_broker",
]

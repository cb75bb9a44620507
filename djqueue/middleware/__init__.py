"""Middleware: every cross-cutting behaviour of the worker, one module per concern."""

from __future__ import annotations

from importlib import import_module

from .base import Middleware

__all__ = ["DEFAULT_MIDDLEWARE", "Middleware", "default_middleware", "load_middleware"]

# The default stack, in order. Dotted paths so that DJQUEUE["MIDDLEWARE"] can list
# the same strings; brokers that are built outside Django get the same stack.
DEFAULT_MIDDLEWARE = [
    "djqueue.middleware.unique.UniqueJobs",
    "djqueue.middleware.max_deliveries.MaxDeliveries",
    "djqueue.middleware.age_limit.AgeLimit",
    "djqueue.middleware.time_limit.TimeLimit",
    "djqueue.middleware.shutdown.ShutdownNotifications",
    "djqueue.middleware.callbacks.Callbacks",
    "djqueue.middleware.pipelines.Pipelines",
    "djqueue.middleware.retries.Retries",
    "djqueue.middleware.current_message.CurrentMessage",
    "djqueue.middleware.db_connections.DbConnections",
    "djqueue.middleware.results.Results",
    "djqueue.middleware.asyncio.AsyncIO",
    "djqueue.middleware.dead_letters.DeadLetters",
]


def load_middleware(path: str) -> Middleware:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ImportError(f"cannot import middleware {path!r}: {e}") from e
    return cls()


def default_middleware() -> list[Middleware]:
    return [load_middleware(path) for path in DEFAULT_MIDDLEWARE]

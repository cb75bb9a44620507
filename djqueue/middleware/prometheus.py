"""Prometheus: count and time messages in each worker process.

``runworkers --metrics-port PORT`` adds this middleware to every worker process and
serves the sum over all of them (``djqueue/metrics.py``): prometheus_client's
multiprocess mode keeps each process's values in files of a directory that the
supervisor creates for the run, so nothing is sent between processes on the hot path.

Metrics, labelled ``queue_name`` and ``actor_name``:

- ``djqueue_messages_total``: messages whose processing started;
- ``djqueue_message_errors_total``: of those, the ones whose actor raised;
- ``djqueue_message_retries_total``: failures that ``Retries`` enqueued again;
- ``djqueue_dead_letters_total``: messages dead-lettered (for good: retries exhausted,
  ``throws``, malformed, unknown actor, too many deliveries);
- ``djqueue_messages_inprogress``: messages running now (live processes only);
- ``djqueue_message_duration_seconds``: a histogram of how long actors ran.
"""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from .base import Middleware

INSTALL_HINT = "the Prometheus metrics need prometheus_client: pip install 'djqueue[prometheus]'"

# Seconds; from a few milliseconds (a cache write) to the default 10-minute time limit.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LABELS = ("queue_name", "actor_name")


def import_prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return prometheus_client


class _Metrics(NamedTuple):
    """The metric objects, or one (queue, actor) series of each."""

    total: Any
    errors: Any
    retries: Any
    dead_letters: Any
    inprogress: Any
    duration: Any


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> _Metrics:
    """The process's metric objects, created once (registering twice is an error)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            pc = import_prometheus_client()
            _metrics = _Metrics(
                pc.Counter("djqueue_messages", "Messages whose processing started.", LABELS),
                pc.Counter("djqueue_message_errors", "Messages whose actor raised an exception.", LABELS),
                pc.Counter("djqueue_message_retries", "Failed messages enqueued again by Retries.", LABELS),
                pc.Counter("djqueue_dead_letters", "Messages dead-lettered.", LABELS),
                pc.Gauge(
                    "djqueue_messages_inprogress",
                    "Messages being processed now.",
                    LABELS,
                    multiprocess_mode="livesum",
                ),
                pc.Histogram(
                    "djqueue_message_duration_seconds",
                    "How long actors ran, in seconds.",
                    LABELS,
                    buckets=DURATION_BUCKETS,
                ),
            )
        return _metrics


class Prometheus(Middleware):
    """Counts messages, errors, retries and dead letters, and times actors.

    Put it first in the stack (``Prometheus.install(broker)`` does): its
    ``after_process_message`` then runs last, once ``Retries`` has decided whether a
    failure is retried or dead-lettered.
    """

    def __init__(self) -> None:
        self.metrics = get_metrics()
        # One labels() lookup per (queue, actor) for the process's life, not per message.
        self._children: dict[tuple[str, str], _Metrics] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._retries_enabled = True

    @classmethod
    def install(cls, broker: Any) -> Prometheus:
        """Add the middleware to ``broker`` first in its stack (once); return it."""
        existing = broker.get_middleware(cls)
        if existing is not None:
            return existing
        middleware = cls()
        before = type(broker.middleware[0]) if broker.middleware else None
        broker.add_middleware(middleware, before=before)
        return middleware

    def children(self, queue_name: str, actor_name: str) -> _Metrics:
        key = (queue_name, actor_name)
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children.get(key)
                if children is None:
                    children = _Metrics(*(metric.labels(queue_name, actor_name) for metric in self.metrics))
                    self._children[key] = children
        return children

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        from .retries import Retries

        # Without Retries, a failure is acked and gone: it is no retry.
        self._retries_enabled = broker.get_middleware(Retries) is not None

    def before_process_message(self, broker: Any, message: Any) -> None:
        children = self.children(message.message.queue_name, message.message.actor_name)
        children.total.inc()
        children.inprogress.inc()
        # A worker thread runs one message at a time, from this hook to its after_ hook.
        self._local.started = time.perf_counter()

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        children = self.children(message.message.queue_name, message.message.actor_name)
        children.inprogress.dec()
        started = getattr(self._local, "started", None)
        if started is not None:
            children.duration.observe(time.perf_counter() - started)
            self._local.started = None
        if exception is not None:
            children.errors.inc()
            if not message.failed and self._retries_enabled:
                children.retries.inc()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self.children(message.message.queue_name, message.message.actor_name).inprogress.dec()

    def after_nack(self, broker: Any, message: Any) -> None:
        self.children(message.message.queue_name, message.message.actor_name).dead_letters.inc()

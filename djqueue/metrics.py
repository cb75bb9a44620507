"""The supervisor's metrics endpoint: ``runworkers --metrics-port PORT``.

Worker processes count with the ``Prometheus`` middleware in prometheus_client's
multiprocess mode: each process writes its values to memory-mapped files in a
directory that this server creates for the run and hands down through the
``PROMETHEUS_MULTIPROC_DIR`` environment variable (set before any worker starts, as
prometheus_client requires). A scrape of ``http://HOST:PORT/metrics`` sums the files.
Counters of a process that exited stay in the sum, so totals never go backwards when a
worker is restarted; its in-progress gauge is dropped (``process_exited``).

Queue depths (``djqueue_queue_depth{queue_name, state}``, state being ``ready``,
``delayed``, ``in_flight`` or ``dead``) are sampled here, once every ``interval``
seconds, whatever the scrape rate: a scrape never touches the broker.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .brokers.base import QueueStats
from .middleware.prometheus import import_prometheus_client

logger = logging.getLogger("djqueue.metrics")

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_INTERVAL = 5.0  # seconds between two queue samples


class QueueDepthCollector:
    """A prometheus_client collector that reports the last queue sample."""

    def __init__(self, samples: Callable[[], dict[str, QueueStats]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "djqueue_queue_depth",
            "Messages in each queue by state (ready, delayed, in_flight, dead), sampled.",
            labels=["queue_name", "state"],
        )
        for queue_name, stats in sorted(self.samples().items()):
            for state, value in stats._asdict().items():
                family.add_metric([queue_name, state], value)
        yield family


class WorkerFilesCollector:
    """prometheus_client's multiprocess sum, minus the files a worker is just creating.

    A worker's first count creates its file and then sizes it; a scrape that lands in
    between would read an empty file, fail to unpack its header and answer 500. Such a
    file holds no value yet, so it is left out of that scrape.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [f for f in glob.glob(os.path.join(self.path, "*.db")) if _has_header(f)]
        return MultiProcessCollector.merge(files, accumulate=True)


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8
    except OSError:  # a live gauge's file removed when its process exited
        return False


class MetricsServer:
    """Serves the workers' summed metrics on ``http://host:port/metrics``.

    ``start()`` must run before the first worker process is started; ``stop()``
    removes the run's directory.
    """

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        broker: Any,
        queues: Iterable[str],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.port = port
        self.host = host
        self.broker = broker
        self.queues = sorted(queues)
        self.interval = interval
        self.directory: str | None = None
        self._samples: dict[str, QueueStats] = {}
        self._stop = threading.Event()
        self._server: Any = None
        self._sampler: threading.Thread | None = None
        self._previous_env: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> None:
        """Create the directory, start sampling and listen; raises OSError if the port
        is taken."""
        pc = import_prometheus_client()
        self.directory = tempfile.mkdtemp(prefix="djqueue-metrics-")
        self._previous_env = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = self.directory
        registry = pc.CollectorRegistry(auto_describe=True)
        registry.register(WorkerFilesCollector(self.directory))
        registry.register(QueueDepthCollector(lambda: self._samples))
        try:
            self._server, _ = pc.start_http_server(self.port, addr=self.host, registry=registry)
        except OSError:
            self._remove_directory()
            raise
        self._sampler = threading.Thread(
            target=self._sample_loop, name="djqueue-metrics-sampler", daemon=True
        )
        self._sampler.start()
        logger.info("serving metrics on %s (files in %s)", self.url, self.directory)

    def process_exited(self, pid: int) -> None:
        """Forget the live gauges of a worker process that exited."""
        if self.directory is None:
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)

    def sample(self) -> None:
        """Read every queue's counts from the broker once."""
        samples = {}
        try:
            for queue_name in self.queues:
                samples[queue_name] = self.broker.get_queue_stats(queue_name)
        except Exception as e:
            # Report no depth rather than a stale one; the next sample tries again.
            logger.warning("could not sample queue depths: %s", e)
            samples = {}
        finally:
            _close_db_connections()
        self._samples = samples

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._sampler is not None:
            self._sampler.join(5)
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        if self._previous_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = self._previous_env


def _close_db_connections() -> None:
    # The sampler thread's Django connections (database broker) are its own: close them
    # between samples rather than hold one open for the life of the supervisor.
    try:
        from django.db import connections
    except ImportError:
        return
    connections.close_all()

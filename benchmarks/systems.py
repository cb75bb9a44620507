"""One adapter per system under test: which brokers it runs on and how its workers start.

Every system runs its workers as real separate processes, the way its documentation
says to run them in production, with the same concurrency: ``processes x threads``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

PY = sys.executable
DJANGO = [PY, "-m", "django"]


@dataclass(frozen=True)
class System:
    name: str
    brokers: tuple[str, ...]
    requires: tuple[str, ...]
    # Brokers it also runs on with --all-pairs; left out by default to keep a full run
    # within about 25 minutes on 2 cores.
    extra_brokers: tuple[str, ...] = ()
    # The workloads it runs (None: all of them).
    workloads: tuple[str, ...] | None = None

    def available(self) -> str | None:
        """None if the system can run here, else why not."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return (
            f"not installed: {', '.join(missing)} (pip install -r requirements/bench.txt)"
            if missing
            else None
        )

    def worker_commands(self, queue: str, processes: int, threads: int, run_id: str) -> list[list[str]]:
        raise NotImplementedError


class Djqueue(System):
    def worker_commands(self, queue: str, processes: int, threads: int, run_id: str) -> list[list[str]]:
        return [
            [
                *DJANGO,
                "runworkers",
                "--settings=benchmarks.settings",
                f"--processes={processes}",
                f"--threads={threads}",
                "--queues",
                queue,
            ]
        ]


class Dramatiq(System):
    app = "benchmarks.peers.dramatiq_app"

    def worker_commands(self, queue: str, processes: int, threads: int, run_id: str) -> list[list[str]]:
        return [[PY, "-m", "dramatiq", self.app, "-p", str(processes), "-t", str(threads), "-Q", queue]]


class DramatiqDjango(Dramatiq):
    """Dramatiq's worker with Django set up, as django_dramatiq runs it: the peer a
    djqueue worker's memory compares with like for like (see peers/dramatiq_django_app)."""

    app = "benchmarks.peers.dramatiq_django_app"


class Celery(System):
    def worker_commands(self, queue: str, processes: int, threads: int, run_id: str) -> list[list[str]]:
        # The threads pool is one process; P processes are P workers on the same queue.
        options = ["-P", "threads", "-c", str(threads), "-Q", queue, "-l", "WARNING"]
        quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        app = ["-A", "benchmarks.peers.celery_app"]
        return [
            [PY, "-m", "celery", *app, "worker", *options, *quiet, "-n", f"w{i}-{run_id}@bench"]
            for i in range(processes)
        ]


class DjangoTasks(System):
    def worker_commands(self, queue: str, processes: int, threads: int, run_id: str) -> list[list[str]]:
        # db_worker runs one task at a time: the same concurrency takes P x T processes.
        options = ["--queue-name", queue, "--no-startup-delay", "--verbosity", "0"]
        return [
            [*DJANGO, "db_worker", "--settings=benchmarks.settings", *options]
            for _ in range(processes * threads)
        ]


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        Djqueue("djqueue", ("redis", "rabbitmq", "postgres", "sqlite"), ("djqueue", "redis")),
        Dramatiq("dramatiq", ("redis", "rabbitmq"), ("dramatiq", "redis", "pika")),
        # Memory only: one drain cell at 1 x 8, which samples the worker's RSS and PSS.
        DramatiqDjango(
            "dramatiq+django",
            ("redis", "rabbitmq"),
            ("dramatiq", "redis", "pika"),
            workloads=("enqueue-drain-1",),
        ),
        Celery("celery", ("redis",), ("celery", "kombu", "redis"), extra_brokers=("rabbitmq",)),
        DjangoTasks(
            "django-tasks", ("postgres",), ("django_tasks", "django_tasks_db"), extra_brokers=("sqlite",)
        ),
    )
}

# Which djqueue broker module each broker name needs (they are written separately).
DJQUEUE_BROKER_MODULES = {
    "redis": "djqueue.brokers.redis",
    "rabbitmq": "djqueue.brokers.rabbitmq",
    "postgres": "djqueue.brokers.database",
    "sqlite": "djqueue.brokers.database",
}


def djqueue_broker_available(broker: str) -> str | None:
    module = DJQUEUE_BROKER_MODULES[broker]
    if importlib.util.find_spec(module) is None:
        return f"{module} does not exist yet"
    return None

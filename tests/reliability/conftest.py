"""Fixtures of the fault-injection suite: brokers, worker processes, measurements, and
the table of figures every scenario reports.

Each scenario calls ``figures.add(...)``; the rows are written to
``<pytest basetemp>/reliability-figures.json`` and printed as a table at the end of the
run (the table in docs/reliability.md comes from there)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from tests.brokers.conftest import BrokerCase, make_case
from tests.process import Workers, rabbitmq_vhost_url, read_records, start_workers

# The database broker on both databases, Redis and RabbitMQ.
BROKERS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]

_ROWS: list[dict[str, Any]] = []
_FIGURES_FILE: list[Path] = []


class Figures:
    """Collects one row per scenario and broker for the figures table."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(
        self,
        scenario: str,
        broker: str,
        *,
        messages: int,
        faults: str,
        lost: int,
        duplicated: int,
        **extra: Any,
    ) -> None:
        row = {
            "scenario": scenario,
            "broker": broker,
            "messages": messages,
            "faults": faults,
            "lost": lost,
            "duplicated": duplicated,
            **extra,
        }
        _ROWS.append(row)
        self.path.write_text(json.dumps(_ROWS, indent=2))


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Figures:
    path = tmp_path_factory.getbasetemp() / "reliability-figures.json"
    _FIGURES_FILE[:] = [path]
    return Figures(path)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability figures")
    write("| scenario | broker | messages | faults injected | lost | duplicated | notes |")
    write("|---|---|---:|---|---:|---:|---|")
    for row in _ROWS:
        notes = ", ".join(
            f"{k} {v}"
            for k, v in row.items()
            if k not in ("scenario", "broker", "messages", "faults", "lost", "duplicated")
        )
        write(
            f"| {row['scenario']} | {row['broker']} | {row['messages']:,} | {row['faults']} | "
            f"{row['lost']} | {row['duplicated']} | {notes} |"
        )
    if _FIGURES_FILE:
        write(f"(written to {_FIGURES_FILE[0]})")


@pytest.fixture(params=BROKERS)
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    """One broker per run of the test, with its own Redis namespace."""
    case = make_case(request.param)
    yield case
    cleanup_case(case)


def cleanup_case(case: BrokerCase) -> None:
    for broker in case.brokers:
        try:
            broker.close()
        except Exception:
            pass
    for connection in connections.all():
        connection.close()
    if case.name == "redis":
        import redis

        client = redis.Redis.from_url(case.url)
        keys = list(client.scan_iter(match=f"{case.options['namespace']}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()
    if case.name == "rabbitmq":
        for broker in case.brokers:
            for queue_name in broker.get_declared_queues():
                if queue_name.startswith("rel_"):
                    try:
                        broker.delete_queue(queue_name)  # type: ignore[attr-defined]
                    except Exception:
                        pass
            try:
                broker.close()
            except Exception:
                pass


@contextmanager
def rabbitmq_vhost(case: BrokerCase) -> Iterator[BrokerCase]:
    """Point ``case`` at a virtual host of its own for the duration, deleted afterwards:
    for broker options (quorum queues) that the queues other tests declared would refuse."""
    with rabbitmq_vhost_url(case.url, "djqueue_rel") as case.url:
        try:
            yield case
        finally:
            for broker in case.brokers:
                try:
                    broker.close()
                except Exception:
                    pass
            case.brokers.clear()


@pytest.fixture
def queue() -> str:
    import uuid

    return f"rel_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    """``workers(url, *args, broker_options=...)`` starts runworkers; killed at teardown."""
    started: list[Workers] = []

    def start(url: str, *args: str, **kwargs: Any) -> Workers:
        w = start_workers(tmp_path, url, *args, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.process.poll() is None:
            for child in w.children():
                try:
                    os.kill(child, 9)
                except ProcessLookupError:
                    pass
            w.process.kill()
            w.process.wait(10)


def executions(record_dir: Path) -> tuple[set[str], int]:
    """(ids of the messages that ran, how many runs were recorded)."""
    records = read_records(record_dir)
    return {message_id for message_id, _, _ in records}, len(records)


def count_lines(record_dir: Path) -> int:
    path = record_dir / "executions.log"
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int, containing: str = "") -> int:
    """How many descriptors ``pid`` has open (whose target contains ``containing``)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if containing in target:
            count += 1
    return count

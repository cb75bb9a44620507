"""Scenario 2, broker restart mid-flight: a producer sends while workers consume, and the
broker goes away and comes back (a private Redis with appendfsync always is killed and
started again; RabbitMQ's app is stopped and started; the PostgreSQL cluster restarts).

Workers and producers reconnect by themselves; every send that returned without error
is executed; a send that could not be stored raised a clear djqueue error to its caller."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from djqueue.brokers import broker_from_url
from djqueue.errors import DjqueueError
from tests.brokers.conftest import RABBITMQ_URL
from tests.process import free_port, wait_for
from tests.reliability.conftest import executions
from tests.testapp.tasks import record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]

SENDS = 1500
SEND_INTERVAL = 0.004  # s between sends: the producer keeps sending through the outage


class Producer(threading.Thread):
    """Sends ``SENDS`` messages one by one, as a web process would, never retrying:
    it records which sends returned and which raised (and what)."""

    def __init__(self, broker: Any, queue: str) -> None:
        super().__init__(daemon=True)
        self.broker = broker
        self.queue = queue
        self.sent: list[str] = []
        self.failed: list[tuple[int, BaseException]] = []
        self.attempts = 0

    def run(self) -> None:
        try:
            for n in range(SENDS):
                self.attempts += 1
                message = record.message_with_options(args=(n,), queue_name=self.queue)
                try:
                    self.sent.append(self.broker.enqueue(message).message_id)
                except Exception as e:
                    self.failed.append((n, e))
                time.sleep(SEND_INTERVAL)
        finally:
            connections.close_all()  # this thread's own connections


class PrivateRedis:
    """A redis-server of the test's own: appendonly with appendfsync always, so that a
    crash loses nothing it acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), timeout=30, interval=0.05, message="the private redis-server")
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


def pg_cluster() -> tuple[str, str]:
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if not versions or not shutil.which("pg_ctlcluster"):
        pytest.fail("the PostgreSQL restart test needs pg_ctlcluster and a cluster in /etc/postgresql")
    return versions[-1], "main"


def run_scenario(
    broker: Any,
    url: str,
    options: dict[str, Any],
    queue: str,
    restart: Callable[[], None],
    record_dir: Path,
    workers: Any,
) -> dict[str, Any]:
    w = workers(url, "--processes", "2", "--threads", "4", "--queues", queue, broker_options=options)
    w.wait_children(2)
    producer = Producer(broker, queue)
    producer.start()
    wait_for(lambda: len(producer.sent) >= 200, timeout=60, message="the first sends")
    restarted_at = time.monotonic()
    restart()
    outage = time.monotonic() - restarted_at
    sent_at_restart_end = producer.attempts
    producer.join(120)
    assert not producer.is_alive()
    for connection in connections.all():  # the test's own connections died with the server
        connection.close()
    sent = set(producer.sent)
    try:
        wait_for(
            lambda: executions(record_dir)[0] >= sent, timeout=120, interval=0.2, message="every sent message"
        )
    except AssertionError:
        missing = sent - executions(record_dir)[0]
        raise AssertionError(f"{len(missing)} sent messages never ran; log:\n{w.output()[-4000:]}") from None
    # Sends that failed said so clearly, with a djqueue error naming the broker.
    for _, error in producer.failed:
        assert isinstance(error, DjqueueError), repr(error)
        assert str(error).strip(), repr(error)
    # The producer reconnected by itself: sends after the outage went through.
    last_failure = max((n for n, _ in producer.failed), default=-1)
    assert last_failure < SENDS - 50, "the producer never recovered"
    assert sent_at_restart_end < SENDS, "the producer finished before the broker was back"
    seen, runs = executions(record_dir)
    assert w.stop() == 0
    return {
        "messages": SENDS,
        "lost": len(sent - seen),
        "duplicated": runs - len(seen),
        "failed_sends": len(producer.failed),
        "outage_s": round(outage, 1),
        "errors": sorted({type(e).__name__ for _, e in producer.failed}),
    }


@pytest.mark.redis
def test_redis_restart(private_redis, queue, record_dir, workers, figures):
    options = {"namespace": f"djqt{uuid.uuid4().hex[:8]}", "heartbeat_timeout": 1500}
    broker = broker_from_url(private_redis.url, **options)

    def restart() -> None:
        private_redis.kill()
        time.sleep(1.0)
        private_redis.start()

    try:
        result = run_scenario(broker, private_redis.url, options, queue, restart, record_dir, workers)
    finally:
        broker.close()
    assert result["lost"] == 0
    figures.add(
        "2. broker restart mid-flight", "redis", faults="redis-server SIGKILLed, restarted 1 s later (AOF)",
        **{k: v for k, v in result.items() if k != "errors"}, send_errors="/".join(result["errors"]) or "-",
    )  # fmt: skip


@pytest.mark.postgres
def test_postgresql_restart(queue, record_dir, workers, figures):
    version, cluster = pg_cluster()
    options = {"lease": 1500}
    broker = broker_from_url("db://postgres", **options)

    def restart() -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
            check=True,
            timeout=120,
            capture_output=True,
        )

    try:
        result = run_scenario(broker, "db://postgres", options, queue, restart, record_dir, workers)
    finally:
        broker.close()
    assert result["lost"] == 0
    figures.add(
        "2. broker restart mid-flight", "postgres", faults=f"pg_ctlcluster {version} main restart",
        **{k: v for k, v in result.items() if k != "errors"}, send_errors="/".join(result["errors"]) or "-",
    )  # fmt: skip


@pytest.mark.rabbitmq
def test_rabbitmq_restart(queue, record_dir, workers, figures):
    # A send waits up to confirm_timeout for RabbitMQ to come back, then raises: shorter
    # than the outage here, so some sends must raise, and every other one must run.
    broker = broker_from_url(RABBITMQ_URL, confirm_timeout=1500)

    def restart() -> None:
        # Disturbs every user of the shared RabbitMQ: the only test that does it, kept short.
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120, capture_output=True)
        time.sleep(1.0)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120, capture_output=True)

    try:
        result = run_scenario(broker, RABBITMQ_URL, {}, queue, restart, record_dir, workers)
    finally:
        try:
            broker.delete_queue(queue)
        finally:
            broker.close()
    assert result["lost"] == 0
    figures.add(
        "2. broker restart mid-flight", "rabbitmq", faults="rabbitmqctl stop_app, start_app 1 s later",
        **{k: v for k, v in result.items() if k != "errors"}, send_errors="/".join(result["errors"]) or "-",
    )  # fmt: skip

"""Start real worker processes (``python -m django runworkers``) from tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_records(directory: Path) -> list[tuple[str, int, str]]:
    """(message id, pid, value) of every recorded actor run."""
    path = Path(directory) / "executions.log"
    if not path.exists():
        return []
    records = []
    # Each record is one append, but a reader may see one that crosses a page boundary
    # half written: the last line counts only once its newline is there.
    for line in path.read_text().split("\n")[:-1]:
        message_id, pid, value = line.split(" ", 2)
        records.append((message_id, int(pid), value))
    return records


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; the fields after its ')' are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def worker_children(pid: int) -> list[int]:
    """The worker processes of a supervisor: its Python children other than the spawn
    helper. A library may run a short-lived program at import (croniter runs ``file``
    on the interpreter), and that child is no worker."""
    python = os.path.realpath(sys.executable)
    result = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            executable = os.path.realpath(f"/proc/{child}/exe")
        except OSError:
            continue
        if b"resource_tracker" not in cmdline and executable == python:
            result.append(child)
    return result


class Workers:
    """A running ``runworkers`` supervisor."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        return worker_children(self.pid)

    def wait_children(self, count: int, timeout: float = 30.0) -> list[int]:
        """The supervisor's ``count`` worker processes, once the same ones are seen on two
        polls in a row: a child between its fork and its exec of another program is a
        Python process only for that instant."""
        previous: list[int] = []

        def settled() -> list[int] | None:
            nonlocal previous
            current = self.children()
            stable = len(current) == count and current == previous
            previous = current
            return current if stable else None

        return wait_for(settled, timeout, interval=0.1, message=f"{count} worker processes")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"runworkers did not stop within {timeout}s; log:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_django(
    *args: str, settings: str = "tests.settings", timeout: float = 120, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """``python -m django ARGS`` in a fresh process with ``settings``; ``env`` adds to the
    environment, and a value of None removes that variable."""
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "PYTHONPATH": str(ROOT)}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_workers(
    tmp_path: Path,
    broker_url: str,
    *args: str,
    broker_options: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    command: str = "runworkers",
) -> Workers:
    """Start ``python -m django runworkers ARGS`` with the test settings and ``broker_url``."""
    environ = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "DJQUEUE_BROKER_URL": broker_url,
        "DJQUEUE_TEST_BROKER_OPTIONS": json.dumps(broker_options or {}),
        "DJQUEUE_LOG_LEVEL": "INFO",
        **(env or {}),
    }
    log = tmp_path / f"{command}-{time.monotonic_ns()}.log"
    # The child writes to its own copy of the descriptor; ours is closed at once.
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "django", command, *args],
            cwd=ROOT,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Workers(process, log)


@contextmanager
def rabbitmq_vhost_url(url: str, prefix: str = "djqueue_test") -> Iterator[str]:
    """``url`` pointed at a RabbitMQ virtual host of its own (guest has every permission),
    deleted afterwards: for queues other tests declared with other arguments, or for
    code that declares every queue of the project."""
    vhost = f"{prefix}_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            timeout=60,
        )
        yield url.rsplit("/", 1)[0] + "/" + vhost
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], timeout=60)


def delete_rabbitmq_queues(url: str, prefix: str) -> None:
    """Delete the RabbitMQ queues whose names start with ``prefix`` (a test's own)."""
    try:
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    names = [line.strip() for line in listing.splitlines() if line.strip().startswith(prefix)]
    if not names:
        return
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in names:
        channel.queue_delete(name)
    connection.close()

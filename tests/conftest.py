from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory where test actors (tests/testapp/tasks.py) record their runs, for this
    process and every worker process it starts."""
    directory = tmp_path / "records"
    directory.mkdir()
    monkeypatch.setenv("DJQUEUE_TEST_RECORD_DIR", str(directory))
    return directory


@pytest.fixture(autouse=True)
def _fresh_record_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if "DJQUEUE_TEST_RECORD_DIR" in os.environ:
        monkeypatch.delenv("DJQUEUE_TEST_RECORD_DIR")


@pytest.fixture
def stub_broker():
    """A fresh in-memory broker with the default middleware, made the current broker."""
    from djqueue.brokers import get_broker, set_broker
    from djqueue.brokers.stub import StubBroker

    previous = get_broker()
    broker = StubBroker()
    set_broker(broker)
    yield broker
    set_broker(previous)
    broker.close()


@pytest.fixture
def stub_worker(stub_broker):
    """A started in-process worker on ``stub_broker`` with 2 threads and a short timeout."""
    from djqueue import Worker

    worker = Worker(stub_broker, worker_threads=2, worker_timeout=100)
    yield worker
    worker.stop(timeout=5_000)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def start_processes(tmp_path: Path, request: pytest.FixtureRequest):
    """``start(broker_url, *args, **kwargs)`` starts ``runworkers`` (or another command)
    like tests.process.start_workers; whatever is still running at teardown is killed.
    When the test failed, the processes' logs are printed: they are where a worker
    that died or misbehaved says why."""
    from tests.process import start_workers

    started = []

    def start(broker_url: str, *args: str, **kwargs: object):
        process = start_workers(tmp_path, broker_url, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(10)
    if request.node.stash.get(CALL_FAILED, False):
        for process in started:
            print(f"--- log of {process.log.name} ---\n{process.output()}")

"""When the supervisor forks worker processes and when it spawns them (the processes
themselves are tested end to end in test_runworkers.py)."""

from __future__ import annotations

import threading

import pytest

from djqueue.supervisor import Supervisor, WorkerConfig


def supervisor(**kwargs) -> Supervisor:
    config = kwargs.pop("config", WorkerConfig())
    return Supervisor(config, processes=1, **kwargs)


def test_forks_from_a_set_up_single_threaded_process():
    # The test process has Django set up; whether it forks depends only on its threads.
    assert supervisor().can_fork() == (threading.active_count() == 1)


def test_spawns_while_another_thread_runs():
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert not supervisor().can_fork()
    finally:
        release.set()
        thread.join()


def test_spawns_after_a_reload_request():
    s = supervisor()
    s.reloaded = True
    assert not s.can_fork()


def test_spawns_with_metrics():
    # prometheus_client picks its multiprocess mode at import; the server's threads run here.
    assert not supervisor(config=WorkerConfig(metrics=True)).can_fork()


def test_start_method_can_be_forced():
    assert supervisor(start_method="fork").can_fork()
    assert not supervisor(start_method="spawn").can_fork()
    with pytest.raises(ValueError, match="start_method"):
        supervisor(start_method="forkserver")

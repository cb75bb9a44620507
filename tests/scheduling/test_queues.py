"""The queues crontab entries send to are queues of the project (djqueue/scheduling/queues.py)."""

from __future__ import annotations

import json

import pytest
from django.test import override_settings

from djqueue import Middleware
from djqueue.brokers.stub import StubBroker
from djqueue.dashboard import queue_names
from djqueue.errors import ConfigurationError
from djqueue.scheduling.checks import check_crontabs
from djqueue.scheduling.queues import crontab_queue_names, declare_crontab_queues
from djqueue.testing import stub_broker
from djqueue.worker import Worker
from tests.process import run_django

EVERY_MINUTE = "* * * * *"


def at_start_up(crontabs: dict, expression: str) -> object:
    """``expression`` (JSON; ``broker`` is the current broker) in a fresh ``shell`` process
    with ``crontabs`` and the stub broker: what Django's start-up alone has done."""
    code = "import json; from djqueue import get_broker; broker = get_broker(); "
    code += f"print(json.dumps({expression}))"
    result = run_django(
        "shell",
        "-c",
        code,
        settings="tests.scheduling.settings",
        DJQUEUE_TEST_CRONTABS=json.dumps(crontabs),
        DJQUEUE_BROKER_URL=None,  # the stub broker
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_queue_names_of_the_entries():
    crontabs = {
        "b": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "monitoring"},
        "a": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "monitoring"},
        "reports": {"actor": "record", "schedule": "@daily", "queue_name": "reports", "enabled": False},
        "actors-own": {"actor": "record", "schedule": EVERY_MINUTE},
        "bad-queue": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "no spaces"},
        "not-a-dict": ["record"],
        "": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "unnamed"},
    }
    # Once each, sorted; a disabled entry counts (its earlier ticks may still wait);
    # invalid entries and names are left to the checks.
    assert crontab_queue_names(crontabs) == ["monitoring", "reports"]
    assert crontab_queue_names(None) == crontab_queue_names([]) == []


def test_every_process_declares_the_crontab_queues_at_start_up():
    # What runworkers (supervisor and worker processes), queuestats, the metrics and the
    # admin dashboard ask for "the project's queues": the broker's declared queues.
    crontabs = {"mon": {"actor": "sched.tick", "schedule": EVERY_MINUTE, "queue_name": "monitoring"}}
    declared = at_start_up(crontabs, "sorted(broker.get_declared_queues())")
    assert "monitoring" in declared
    assert "default" in declared, "with the actors' queues"


@pytest.mark.django_db
def test_a_declared_crontab_queue_is_one_of_the_project_queues():
    broker = StubBroker()
    crontabs = {"mon": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "monitoring"}}
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "CRONTABS": crontabs}):
        assert declare_crontab_queues(broker) == {}
    assert "monitoring" in broker.get_declared_queues()
    assert "monitoring" in queue_names(broker), "queuestats and the admin dashboard list it"
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert "monitoring" in worker.consumers, "a worker without queues= consumes it"
    finally:
        worker.stop(timeout=5_000)
    broker.close()


class OnlyJobQueues(Middleware):
    def before_declare_queue(self, broker, queue_name):
        if not queue_name.startswith("jobs."):
            raise ConfigurationError(f"queue {queue_name!r} does not start with 'jobs.'")


def test_a_queue_the_broker_refuses_fails_the_check():
    crontabs = {
        "refused": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "mon"},
        "accepted": {"actor": "record", "schedule": EVERY_MINUTE, "queue_name": "jobs.mon"},
    }
    with stub_broker() as broker, override_settings(DJQUEUE={"BROKER_URL": "stub://", "CRONTABS": crontabs}):
        broker.add_middleware(OnlyJobQueues())
        errors = check_crontabs()
        assert [e.id for e in errors] == ["djqueue.E019"], errors
        assert errors[0].msg.startswith("DJQUEUE['CRONTABS']['refused']['queue_name'] names queue 'mon'")
        assert "no worker would consume it: queue 'mon' does not start with 'jobs.'" in errors[0].msg
        assert errors[0].hint
        assert "jobs.mon" in broker.get_declared_queues()


def test_an_actor_named_by_a_dotted_path_outside_tasks_modules_is_known_to_every_process():
    # Autodiscovery imports tasks modules only; without this, a worker process started
    # without the checks (spawned, or --skip-checks) dead-lettered every tick as an
    # unknown actor, and runworkers without --queues did not consume its queue.
    path = "tests.scheduling.schedapp.jobs.cleanup"
    crontabs = {"cleanup": {"actor": path, "schedule": "@daily"}}
    # shell runs no system checks: only start-up imports the module.
    known, declared = at_start_up(
        crontabs, f"[broker.get_actor({path!r}) is not None, sorted(broker.get_declared_queues())]"
    )
    assert known and "cleanup" in declared

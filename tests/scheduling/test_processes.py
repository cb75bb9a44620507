"""runscheduler end to end: real scheduler and worker processes on the database broker."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from djqueue.models import QueuedMessage, ScheduleRun
from djqueue.scheduling.crontab import Schedule
from tests.process import rabbitmq_vhost_url, read_records, run_django, start_workers, wait_for

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "postgres"]), pytest.mark.slow]

EVERY_2_SECONDS = "* * * * * */2"  # croniter: seconds are the sixth field


@pytest.fixture
def processes(tmp_path):
    started = []

    def start(broker_url: str, crontabs: dict, *args: str, command: str = "runscheduler"):
        env = {
            "DJANGO_SETTINGS_MODULE": "tests.scheduling.settings",
            "DJQUEUE_TEST_CRONTABS": json.dumps(crontabs),
        }
        process = start_workers(tmp_path, broker_url, *args, command=command, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(10)


def started_at(scheduler) -> datetime:
    """When the scheduler started, from its log: the boundary of what it counts as missed."""
    match = wait_for(
        lambda: re.search(r"scheduler started at (\S+):", scheduler.output()), timeout=60, message="start"
    )
    return datetime.fromisoformat(match.group(1))


def runs(alias: str, name: str) -> list[ScheduleRun]:
    return list(ScheduleRun.objects.using(alias).filter(name=name).order_by("fire_time"))


@pytest.mark.parametrize(
    "broker_url",
    [
        pytest.param("db://default", id="sqlite"),
        pytest.param("db://postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def test_two_schedulers_fire_and_run_each_tick_exactly_once(broker_url, processes, record_dir):
    alias = broker_url.split("://")[1]
    queue = f"sched_{uuid.uuid4().hex[:8]}"
    name = f"tick-{uuid.uuid4().hex[:6]}"
    crontabs = {name: {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue}}
    schedulers = [processes(broker_url, crontabs, "-v", "3") for _ in range(2)]
    workers = processes(
        broker_url, crontabs, "--processes", "1", "--threads", "2", "--queues", queue, command="runworkers"
    )
    both_up = max(started_at(s) for s in schedulers)
    # About ten seconds of ticks with both schedulers running.
    wait_for(
        lambda: len([r for r in runs(alias, name) if r.fire_time > both_up]) >= 5,
        timeout=60,
        message="5 ticks",
    )
    stopping = datetime.now(ZoneInfo("UTC"))
    assert [s.stop() for s in schedulers] == [0, 0], "SIGTERM stops a scheduler with exit code 0"
    fired = runs(alias, name)
    fire_times = [r.fire_time for r in fired]
    assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(fire_times)), (
        "every tick, none twice"
    )
    late = [(r.enqueued_at - r.fire_time).total_seconds() for r in fired if r.fire_time > both_up]
    assert all(0 <= x < 1 for x in late), f"each tick is enqueued on its second: {late}"
    message_ids = [r.message_id for r in fired]
    wait_for(lambda: len(read_records(record_dir)) >= len(fired), timeout=60, message="every tick executed")
    assert workers.stop() == 0
    records = read_records(record_dir)
    assert sorted(mid for mid, _, _ in records) == sorted(message_ids), "each enqueued message ran once"
    scheduled = {mid: datetime.fromisoformat(at) for mid, _, at in records}
    assert all(scheduled[r.message_id] == r.fire_time for r in fired), "the actor saw its fire time"
    assert not QueuedMessage.objects.using(alias).filter(queue_name=queue).exists()
    # Both schedulers tried every tick while both ran; one of them lost each race.
    losses = sum(s.output().count("was fired by another scheduler") for s in schedulers)
    assert losses >= len([t for t in fire_times if both_up < t < stopping - timedelta(seconds=1)])


def test_a_restarted_scheduler_applies_the_catch_up_policy(processes):
    broker_url, alias = "db://default", "default"
    suffix = uuid.uuid4().hex[:6]
    latest, skip = f"latest-{suffix}", f"skip-{suffix}"
    queue = f"sched_{suffix}"
    crontabs = {
        latest: {
            "actor": "sched.tick",
            "schedule": EVERY_2_SECONDS,
            "queue_name": queue,
            "catch_up": "latest",
        },
        skip: {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue, "catch_up": "skip"},
    }
    first = processes(broker_url, crontabs)
    wait_for(lambda: runs(alias, latest) and runs(alias, skip), timeout=60, message="a tick of each entry")
    assert first.stop() == 0
    last_fired = {name: runs(alias, name)[-1].fire_time for name in (latest, skip)}
    # Down for long enough to miss at least two ticks.
    wait_for(
        lambda: datetime.now(ZoneInfo("UTC")) > max(last_fired.values()) + timedelta(seconds=5),
        timeout=10,
        interval=0.2,
        message="downtime",
    )
    second = processes(broker_url, crontabs)
    restart = started_at(second)
    wait_for(
        lambda: all(any(r.fire_time > restart for r in runs(alias, n)) for n in (latest, skip)),
        timeout=60,
        message="ticks after the restart",
    )
    assert second.stop() == 0

    schedule = Schedule(EVERY_2_SECONDS, ZoneInfo("UTC"))
    missed_tick = schedule.latest_at_or_before(restart)
    assert missed_tick - last_fired[latest] >= timedelta(seconds=4), "at least two ticks were missed"
    downtime = {
        n: [r for r in runs(alias, n) if last_fired[n] < r.fire_time <= restart] for n in (latest, skip)
    }
    assert [r.fire_time for r in downtime[latest]] == [missed_tick], "'latest' fires the most recent, once"
    assert downtime[skip] == [], "'skip' fires none of them"
    caught_up = QueuedMessage.objects.get(message_id=downtime[latest][0].message_id)
    assert caught_up.queue_name == queue
    assert "catching up the tick of" in second.output()


@contextlib.contextmanager
def scheduler_process(monkeypatch, crontabs: dict, *args: object) -> Iterator[Any]:
    """What runworkers --scheduler starts: scheduler_process_main in a 'spawn' child,
    with ``args`` after (log_file, log_level); killed if still alive at the end."""
    import multiprocessing

    from djqueue.scheduling.scheduler import scheduler_process_main

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.scheduling.settings")
    monkeypatch.setenv("DJQUEUE_BROKER_URL", "db://default")
    monkeypatch.setenv("DJQUEUE_TEST_CRONTABS", json.dumps(crontabs))
    process = multiprocessing.get_context("spawn").Process(
        target=scheduler_process_main, args=(None, "INFO", *args)
    )
    process.start()
    try:
        yield process
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)


def test_the_supervised_scheduler_process(monkeypatch):
    import signal

    name = f"supervised-{uuid.uuid4().hex[:6]}"
    crontabs = {name: {"actor": "sched.tick", "schedule": "* * * * * */1", "queue_name": "supervised"}}
    with scheduler_process(monkeypatch, crontabs) as process:
        wait_for(lambda: len(runs("default", name)) >= 2, timeout=60, message="ticks from the child process")
        os.kill(process.pid, signal.SIGTERM)
        process.join(30)
        assert process.exitcode == 0


def test_a_scheduler_whose_supervisor_died_while_it_booted_stops(monkeypatch):
    # The supervisor's pid is handed over at start: one that died before the scheduler
    # set Django up (here, before it even started) must still be noticed.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    with scheduler_process(monkeypatch, {}, gone.pid) as process:
        process.join(30)
        assert process.exitcode == 0


def test_runscheduler_list_in_a_process():
    crontabs = {"nightly": {"actor": "sched.tick", "schedule": "30 2 * * *", "timezone": "America/New_York"}}
    environment = {"DJQUEUE_TEST_CRONTABS": json.dumps(crontabs)}
    result = run_django("runscheduler", "--list", settings="tests.scheduling.settings", **environment)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "nightly: sched.tick | 30 2 * * * | America/New_York | catch_up=latest"
    assert len(lines) == 6 and all(
        re.fullmatch(r"    \d{4}-\d\d-\d\dT0[23]:[03]0:00-0[45]:00", x) for x in lines[1:]
    )


def test_runworkers_with_scheduler_fires_and_runs_ticks(processes, record_dir):
    alias = "default"
    queue = f"sched_{uuid.uuid4().hex[:8]}"
    name = f"inproc-{uuid.uuid4().hex[:6]}"
    crontabs = {name: {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue}}
    workers = processes(
        "db://default",
        crontabs,
        "--processes", "1", "--threads", "2", "--queues", queue, "--scheduler",
        command="runworkers",
    )  # fmt: skip
    wait_for(lambda: len(runs(alias, name)) >= 2, timeout=60, message="two ticks")
    wait_for(
        lambda: {r.message_id for r in runs(alias, name)[:2]} <= {m for m, _, _ in read_records(record_dir)},
        timeout=30,
        message="the ticks executed by the same runworkers",
    )
    assert workers.stop() == 0
    assert "with the scheduler" in workers.output()
    fire_times = [r.fire_time for r in runs(alias, name)]
    assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(fire_times))


def banner_queues(output: str) -> list[str]:
    """The queues a runworkers start-up banner names."""
    match = re.search(r"\| queues ([^|]+) \|", output)
    assert match, output
    return match.group(1).strip().split(", ")


def _first_tick_runs(name: str, workers, record_dir) -> None:
    """Wait for entry ``name``'s first tick, then for a worker to run it."""
    wait_for(lambda: runs("default", name), timeout=60, message="a tick")
    first = runs("default", name)[0].message_id
    wait_for(
        lambda: first in {m for m, _, _ in read_records(record_dir)},
        timeout=30,
        message=f"the tick run by a worker; log:\n{workers.output()}",
    )


@pytest.mark.parametrize("scheduler", ["--scheduler", "runscheduler"])
def test_runworkers_without_queues_consumes_the_queue_of_a_crontab_entry(scheduler, processes, record_dir):
    # No --queues: the entry's queue_name is one of the project's queues, whether the
    # scheduler runs inside runworkers or in a runscheduler of its own.
    queue = f"sched_{uuid.uuid4().hex[:8]}"
    name = f"own-queue-{uuid.uuid4().hex[:6]}"
    crontabs = {name: {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue}}
    args = ["--processes", "1", "--threads", "2"]
    if scheduler == "runscheduler":
        processes("db://default", crontabs)
    else:
        args.append("--scheduler")
    workers = processes("db://default", crontabs, *args, command="runworkers")
    _first_tick_runs(name, workers, record_dir)
    assert workers.stop() == 0
    assert queue in banner_queues(workers.output())


def test_queuestats_lists_the_queue_of_a_crontab_entry():
    from djqueue.brokers import broker_from_url
    from djqueue.message import Message

    queue = f"sched_{uuid.uuid4().hex[:8]}"
    crontabs = {"mon": {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue}}
    broker = broker_from_url("db://default")
    try:
        broker.enqueue(Message(queue_name=queue, actor_name="sched.tick", args=(), kwargs={}, options={}))
    finally:
        broker.close()
    result = run_django(
        "queuestats",
        "--json",
        settings="tests.scheduling.settings",
        DJQUEUE_BROKER_URL="db://default",
        DJQUEUE_TEST_CRONTABS=json.dumps(crontabs),
    )
    assert result.returncode == 0, result.stderr
    rows = {row["queue_name"]: row for row in json.loads(result.stdout)["queues"]}
    assert queue in rows, f"queuestats lists only {sorted(rows)}"
    assert rows[queue]["ready"] == 1


@pytest.fixture
def own_vhost_url() -> Iterator[str]:
    """A RabbitMQ virtual host of the test's own (runworkers without --queues declares
    every queue of the project), deleted afterwards."""
    base = os.environ.get("DJQUEUE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    with rabbitmq_vhost_url(base, "djqueue_sched") as url:
        yield url


@pytest.mark.rabbitmq
def test_a_crontab_queue_is_consumed_and_declared_like_an_actors_queue_on_rabbitmq(
    processes, record_dir, own_vhost_url
):
    queue = f"sched_{uuid.uuid4().hex[:8]}"
    name = f"rabbit-{uuid.uuid4().hex[:6]}"
    crontabs = {name: {"actor": "sched.tick", "schedule": EVERY_2_SECONDS, "queue_name": queue}}
    workers = processes(
        own_vhost_url,
        crontabs,
        "--processes",
        "1",
        "--threads",
        "2",
        "--scheduler",
        command="runworkers",
    )
    _first_tick_runs(name, workers, record_dir)
    assert workers.stop() == 0
    vhost = own_vhost_url.rsplit("/", 1)[1]
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments", "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    arguments = {q["name"]: q["arguments"] for q in json.loads(listing.stdout)}

    def topology(queue_name: str) -> dict[str, list]:
        # Each queue of the family with its arguments, the queue's own name taken out.
        family = {k: v for k, v in arguments.items() if k == queue_name or k.startswith(queue_name + ".")}
        return {
            k.replace(queue_name, "Q", 1): sorted(json.dumps(a).replace(queue_name, "Q") for a in v)
            for k, v in family.items()
        }

    assert {"Q", "Q.RQ", "Q.DQ"} <= set(topology(queue))
    assert topology(queue) == topology("default"), "the same queues, with the same arguments"

"""The scheduler in this process: claims, catch-up, the loop's timing, retries, pruning."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connections

from djqueue import actor, get_current_message
from djqueue.brokers import broker_from_url
from djqueue.brokers.stub import StubBroker
from djqueue.errors import MessageTooLarge
from djqueue.models import QueuedMessage, ScheduleRun
from djqueue.scheduling.crontab import CrontabEntry, Schedule
from djqueue.scheduling.scheduler import Scheduler, run_scheduler
from tests.process import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default"])


def entry(schedule: str = "* * * * * */10", **options) -> CrontabEntry:
    options.setdefault("actor", "sched_test.job")
    name = options.pop("name", f"job-{uuid.uuid4().hex[:6]}")
    return CrontabEntry.from_setting(name, {"schedule": schedule, **options}, default_timezone="UTC")


@pytest.fixture
def job(stub_broker):
    runs = []

    @actor(broker=stub_broker, actor_name="sched_test.job")
    def job(value: object = None) -> None:
        runs.append((value, get_current_message().options["scheduled_at"]))

    job.runs = runs
    return job


@pytest.fixture
def db_broker():
    broker = broker_from_url("db://default")

    @actor(broker=broker, actor_name="sched_test.job")
    def job(value: object = None) -> None:
        pass

    yield broker
    broker.close()


def in_thread(scheduler: Scheduler, **kwargs) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), kwargs=kwargs, daemon=True)
    thread.start()
    return thread, stop


def stop_thread(thread: threading.Thread, stop: threading.Event) -> None:
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the scheduler stops at once when asked"


def tick(at: str = "2024-06-01T12:00:00") -> datetime:
    return datetime.fromisoformat(at).replace(tzinfo=UTC)


def test_a_tick_is_enqueued_once_with_its_fire_time(stub_broker, job):
    berlin = entry("30 2 * * *", kwargs={"value": 7}, timezone="Europe/Berlin", queue_name="nightly")
    scheduler = Scheduler([berlin], broker=stub_broker)
    fire_time = datetime(2024, 3, 31, 1, 0, tzinfo=UTC)  # 03:00 CEST, the skipped 02:30's slot
    message = scheduler.fire(berlin, fire_time)
    assert message is not None and message.queue_name == "nightly" and message.kwargs == {"value": 7}
    assert message.options["scheduled_at"] == "2024-03-31T03:00:00+02:00"
    assert message.options["schedule"] == berlin.name
    assert scheduler.fire(berlin, fire_time) is None, "the same tick fires once"
    assert Scheduler([berlin], broker=stub_broker).fire(berlin, fire_time) is None, "in any scheduler"
    run = ScheduleRun.objects.get()
    assert (run.name, run.fire_time, run.message_id) == (berlin.name, fire_time, message.message_id)
    assert stub_broker.get_queue_stats("nightly").ready == 1


def test_the_actor_reads_its_fire_time(stub_broker, stub_worker, job):
    scheduler = Scheduler([entry(args=["x"])], broker=stub_broker)
    scheduler.fire(scheduler.entries[0], tick())
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert job.runs == [("x", "2024-06-01T12:00:00+00:00")]


@pytest.mark.parametrize("transactional", [False, True], ids=["stub", "db"])
def test_racing_schedulers_fire_each_tick_once(stub_broker, db_broker, job, transactional):
    broker = db_broker if transactional else stub_broker
    shared = entry(queue_name=f"q_{uuid.uuid4().hex[:8]}")
    schedulers = [Scheduler([shared], broker=broker) for _ in range(4)]
    assert schedulers[0].transactional is transactional
    ticks = [tick() + timedelta(seconds=10 * n) for n in range(5)]
    won: list[str] = []
    barrier = threading.Barrier(len(schedulers))

    def race(scheduler: Scheduler) -> None:
        try:
            for fire_time in ticks:
                barrier.wait(5)
                message = scheduler.fire(shared, fire_time)
                if message is not None:
                    won.append(message.message_id)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == len(ticks)
    assert set(ScheduleRun.objects.values_list("message_id", flat=True)) == set(won)
    assert broker.get_queue_stats(shared.queue_name).ready == len(ticks)
    if transactional:
        assert set(QueuedMessage.objects.values_list("message_id", flat=True)) == set(won)


@pytest.mark.parametrize("transactional", [False, True], ids=["stub", "db"])
def test_a_failed_enqueue_leaves_the_tick_unclaimed(stub_broker, db_broker, job, transactional):
    broker = db_broker if transactional else stub_broker
    scheduler = Scheduler([entry(args=["x" * 2000])], broker=broker)
    broker.max_message_size = 1000
    with pytest.raises(MessageTooLarge):
        scheduler.fire(scheduler.entries[0], tick())
    assert not ScheduleRun.objects.exists()
    broker.max_message_size = 1_000_000
    assert scheduler.fire(scheduler.entries[0], tick()) is not None, "it can be fired later"


def test_the_loop_fires_on_the_second_without_drift(stub_broker, job):
    every_second = entry("* * * * * *")
    scheduler = Scheduler([every_second], broker=stub_broker)
    thread, stop = in_thread(scheduler)
    wait_for(lambda: ScheduleRun.objects.count() >= 3, timeout=10, message="three ticks")
    stop_thread(thread, stop)
    runs = list(ScheduleRun.objects.order_by("fire_time"))
    fire_times = [r.fire_time for r in runs]
    assert all(t.microsecond == 0 for t in fire_times)
    assert [b - a for a, b in itertools.pairwise(fire_times)] == [timedelta(seconds=1)] * (len(runs) - 1), (
        "no tick missed or doubled"
    )
    lateness = [(r.enqueued_at - r.fire_time).total_seconds() for r in runs]
    assert all(0 <= late < 0.25 for late in lateness), lateness
    assert fire_times[0] > scheduler.started_at, "no catch-up for an entry that never fired"


def test_catch_up_latest_fires_the_most_recent_missed_tick(stub_broker, job):
    latest = entry("* * * * *", catch_up="latest")
    scheduler = Scheduler([latest], broker=stub_broker)
    now = tick("2024-06-01T12:34:56")
    assert scheduler.catch_up(latest, now) is None, "never fired: nothing was missed"
    ScheduleRun.objects.create(name=latest.name, fire_time=tick("2024-06-01T11:00:00"))
    message = scheduler.catch_up(latest, now)
    assert message is not None and message.options["scheduled_at"] == "2024-06-01T12:34:00+00:00"
    assert ScheduleRun.objects.filter(name=latest.name).count() == 2, "one firing for the 94 missed ticks"
    assert scheduler.catch_up(latest, now) is None, "caught up"


def test_catch_up_skip_fires_nothing(stub_broker, job):
    skip = entry("* * * * *", catch_up="skip")
    scheduler = Scheduler([skip], broker=stub_broker)
    ScheduleRun.objects.create(name=skip.name, fire_time=tick("2024-06-01T11:00:00"))
    assert scheduler.catch_up(skip, tick("2024-06-01T12:34:56")) is None
    assert ScheduleRun.objects.count() == 1
    assert stub_broker.get_queue_stats("default").ready == 0


def test_a_scheduler_that_fell_behind_fires_only_the_latest_tick(stub_broker, job):
    # The clock jumps an hour ahead after the first firing, as after a suspended machine.
    def clock() -> float:
        return time.time() + (3600 if stub_broker.get_queue_stats("default").ready else 0)

    scheduler = Scheduler([entry("* * * * * *")], broker=stub_broker, clock=clock)
    thread, stop = in_thread(scheduler)
    wait_for(lambda: ScheduleRun.objects.count() >= 3, timeout=10, message="ticks after the jump")
    stop_thread(thread, stop)
    first, second, third = list(ScheduleRun.objects.order_by("fire_time"))[:3]
    assert second.fire_time - first.fire_time >= timedelta(seconds=3599), "the stale ticks were not fired"
    assert third.fire_time - second.fire_time == timedelta(seconds=1)


class FlakyBroker(StubBroker):
    """Fails its first ``failures`` enqueues, as a broker that is briefly down."""

    failures = 1

    def _enqueue(self, message, data):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        super()._enqueue(message, data)


def test_a_tick_whose_firing_failed_is_retried():
    broker = FlakyBroker()

    @actor(broker=broker, actor_name="sched_test.job")
    def job() -> None:
        pass

    every_ten = entry("* * * * * */10")
    # A clock 0.3 s before a tick, so the retry (after 1 s) comes well before the next one.
    now = time.time()
    offset = (every_ten.schedule.next_after(datetime.fromtimestamp(now, UTC)).timestamp() - 0.3) - now
    scheduler = Scheduler([every_ten], broker=broker, clock=lambda: time.time() + offset)
    thread, stop = in_thread(scheduler)
    run = wait_for(lambda: ScheduleRun.objects.first(), timeout=10, message="the retried tick")
    stop_thread(thread, stop)
    assert broker.failures == 0
    assert run.fire_time.timestamp() == pytest.approx(scheduler.started_at.timestamp() + 0.3, abs=0.05)
    assert 1.0 <= (run.enqueued_at - run.fire_time).total_seconds() < 2.0, "retried after a second"
    assert ScheduleRun.objects.count() == 1
    assert broker.get_queue_stats("default").ready == 1


def test_pruning_keeps_a_week_and_each_latest_run(stub_broker, job):
    now = tick()
    old = now - timedelta(days=30)
    ScheduleRun.objects.bulk_create(
        [ScheduleRun(name="a", fire_time=old + timedelta(minutes=n)) for n in range(5)]
        + [ScheduleRun(name="b", fire_time=now - timedelta(hours=n)) for n in range(3)]
        + [ScheduleRun(name="gone", fire_time=old)]
    )
    scheduler = Scheduler([], broker=stub_broker)
    assert scheduler.prune(now) == 4
    left = sorted(ScheduleRun.objects.values_list("name", "fire_time"))
    assert left == [
        ("a", old + timedelta(minutes=4)),
        ("b", now - timedelta(hours=2)),
        ("b", now - timedelta(hours=1)),
        ("b", now),
        ("gone", old),
    ]


def test_run_scheduler_with_nothing_configured_waits_for_stop(stub_broker):
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.2)  # it must still be running: an empty scheduler is idle, not finished
    assert thread.is_alive()
    stop_thread(thread, stop)
    # should_stop ends it too, e.g. when runworkers' supervisor is gone.
    run_scheduler(threading.Event(), should_stop=lambda: True)


def test_runscheduler_list(settings, capsys):
    settings.DJQUEUE = {
        **settings.DJQUEUE,
        "CRONTABS": {
            "nightly": {"actor": "record", "schedule": "30 2 * * *", "timezone": "Europe/Berlin"},
            "off": {"actor": "record", "schedule": "@hourly", "enabled": False},
        },
    }
    call_command("runscheduler", "--list")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nightly: record | 30 2 * * * | Europe/Berlin | catch_up=latest"
    times = [datetime.fromisoformat(line.strip()) for line in out[1:6]]
    assert all((t.hour, t.minute) in {(2, 30), (3, 0)} and t.utcoffset() for t in times)
    assert out[6].startswith("off (disabled): record | @hourly")


def test_a_schedule_that_fires_no_more_does_not_stop_the_others(stub_broker, job):
    # A seventh field limits a schedule to some years; once past, it has nothing to fire.
    finished = CrontabEntry(name="y2020", actor="sched_test.job", schedule=Schedule("0 0 1 1 * 0 2020", UTC))
    scheduler = Scheduler([finished, entry("* * * * * *", name="live")], broker=stub_broker)
    thread, stop = in_thread(scheduler)
    wait_for(lambda: ScheduleRun.objects.filter(name="live").count() >= 2, timeout=10, message="live ticks")
    assert thread.is_alive()
    stop_thread(thread, stop)
    assert not ScheduleRun.objects.filter(name="y2020").exists()

"""Scenario 3, crash-looping job: an actor that kills its own process (``os._exit(1)``,
or SIGKILL as the OOM killer would) is delivered a bounded number of times
(DJQUEUE["MAX_DELIVERIES"]) and then dead-lettered with a reason saying so, while the
other messages keep flowing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from djqueue import conf
from djqueue.models import DeadLetter
from tests.brokers.conftest import BrokerCase, make_case
from tests.process import read_records, wait_for
from tests.reliability.conftest import BROKERS, cleanup_case, executions, rabbitmq_vhost
from tests.testapp.tasks import slow_record
from tests.testapp.tasks_reliability import crash_loop

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]


@pytest.fixture(
    params=[
        *BROKERS,
        pytest.param("rabbitmq-quorum", id="rabbitmq-quorum", marks=pytest.mark.rabbitmq),
    ]
)
def crash_case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    quorum = request.param == "rabbitmq-quorum"
    case = make_case("rabbitmq" if quorum else request.param)
    try:
        if quorum:
            # In a virtual host of its own: the shared one's queues were declared classic.
            case.options["queue_type"] = "quorum"
            with rabbitmq_vhost(case):
                yield case
        else:
            yield case
    finally:
        cleanup_case(case)


def test_crash_looping_job_is_dead_lettered_and_work_goes_on(crash_case, queue, record_dir, workers, figures):
    case = crash_case
    broker = case.make()
    limit = conf.get("MAX_DELIVERIES")
    w = workers(
        case.url, "--processes", "2", "--threads", "4", "--queues", queue,
        broker_options=case.process_options(),
    )  # fmt: skip
    w.wait_children(2)

    def send_good(count: int) -> set[str]:
        messages = [slow_record.message_with_options(args=(n, 0.005), queue_name=queue) for n in range(count)]
        return {m.message_id for m in broker.enqueue_many(messages)}

    good = send_good(50)
    crashers = {
        how: broker.enqueue(crash_loop.message_with_options(args=(how,), queue_name=queue)).message_id
        for how in ("exit", "sigkill")
    }
    good |= send_good(50)
    started = time.monotonic()

    def crashers_dead() -> bool:
        return DeadLetter.objects.filter(message_id__in=crashers.values()).count() == 2

    # Keep other messages flowing while the crashers take processes down.
    while not crashers_dead():
        assert time.monotonic() - started < 180, f"crashers not dead-lettered; log:\n{w.output()[-5000:]}"
        good |= send_good(10)
        time.sleep(0.5)
    dead_after = time.monotonic() - started

    def innocents() -> set[str]:
        dead = DeadLetter.objects.filter(queue_name=queue).exclude(message_id__in=crashers.values())
        return set(dead.values_list("message_id", flat=True))

    # Every good message ran, or was (wrongly) dead-lettered: then the test fails below.
    wait_for(
        lambda: executions(record_dir)[0] | innocents() >= good, timeout=60, message="every good message"
    )
    attempts = {
        how: sum(1 for mid, _, _ in read_records(record_dir) if mid == message_id)
        for how, message_id in crashers.items()
    }
    seen, runs = executions(record_dir)
    wrongly_dead = innocents()
    figures.add(
        "3. crash-looping job (2 processes x 4 threads)",
        case.name + (" (quorum queues)" if case.options.get("queue_type") == "quorum" else ""),
        messages=len(good) + 2, faults="2 jobs that kill their process (os._exit(1), SIGKILL)",
        lost=len(good - seen), duplicated=runs - sum(attempts.values()) - len(good & seen),
        crasher_runs=f"{attempts['exit']}+{attempts['sigkill']}", seconds_to_dead_letter=round(dead_after, 1),
        innocents_dead_lettered=len(wrongly_dead),
    )  # fmt: skip
    assert not wrongly_dead, (
        f"{len(wrongly_dead)} innocent messages were dead-lettered with the crashers: "
        f"{DeadLetter.objects.get(message_id=next(iter(wrongly_dead))).exception_message}"
    )
    for how, message_id in crashers.items():
        reason = DeadLetter.objects.get(message_id=message_id).exception_message
        assert f"more than max_deliveries={limit}" in reason and "died each time" in reason, reason
        # Each attempt killed a process; a crasher fetched by a process the other one
        # killed was delivered without running, so it may run fewer times, never more.
        assert 1 <= attempts[how] <= limit, attempts
    assert seen >= good
    assert w.stop() == 0

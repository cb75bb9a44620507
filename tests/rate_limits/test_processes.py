"""A concurrent limit holds across real worker processes: 2 runworkers processes of 8
threads each never run more than 2 holders of a ConcurrentRateLimiter at once, with the
limiter's state in the database (SQLite, PostgreSQL) or in Redis."""

from __future__ import annotations

import os
import uuid

import pytest
from django.db import connections

from djqueue.brokers import broker_from_url
from tests.process import start_workers, wait_for
from tests.rate_limits.backends import REDIS_URL
from tests.testapp.tasks_limits import limited_section, read_counter

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "postgres"]), pytest.mark.slow]

BROKERS = [
    pytest.param("db://default", id="sqlite"),
    pytest.param("db://postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param(REDIS_URL, id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=BROKERS)
def broker_case(request):
    url = request.param
    options = {"namespace": f"djqrl{uuid.uuid4().hex[:8]}"} if url.startswith("redis") else {}
    broker = broker_from_url(url, **options)
    yield url, options, broker
    broker.close()
    for connection in connections.all():
        connection.close()
    if options:
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{options['namespace']}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_a_concurrent_limit_of_2_holds_across_2_processes_x_8_threads(broker_case, tmp_path):
    url, options, broker = broker_case
    queue = f"rl_{uuid.uuid4().hex[:8]}"
    counter = str(tmp_path / "counter")
    key = f"limit-{uuid.uuid4().hex[:8]}"
    jobs = 24
    for _ in range(jobs):
        message = limited_section.message_with_options(args=(key, counter, 2, 60), queue_name=queue)
        broker.enqueue(message)
    workers = start_workers(
        tmp_path, url, "--processes", "2", "--threads", "8", "--queues", queue, broker_options=options
    )
    try:
        wait_for(lambda: read_counter(counter)[2] >= jobs, timeout=120, message=f"{jobs} jobs to run")
        wait_for(lambda: broker.get_queue_stats(queue)[:3] == (0, 0, 0), timeout=30, message="queue drained")
    finally:
        code = workers.stop()
    now, most, entered = read_counter(counter)
    assert entered == jobs, f"{entered} entries for {jobs} jobs"
    assert most == 2, f"{most} holders at once with a limit of 2 (the limit must also be reached)"
    assert now == 0
    assert code == 0, workers.output()
    assert os.path.exists(counter)

"""A worker started while its broker is down: it says so in one WARNING line per attempt,
with a doubling delay and the broker's URL with its password masked, never a traceback,
and consumes once the broker is up."""

from __future__ import annotations

import re
import uuid

import pytest

from djqueue.brokers import broker_from_url
from tests.process import read_records, wait_for
from tests.redis_server import RedisServer
from tests.testapp.tasks import record

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ATTEMPT = re.compile(
    r"cannot consume '(?P<queue>[^']+)' from (?P<broker>\S+) .*, "
    r"trying again in (?P<delay>[\d.]+) s \(attempt (?P<attempt>\d+)\): "
)


def attempts(log: str, queue: str) -> list[re.Match[str]]:
    found = (ATTEMPT.search(line) for line in log.splitlines())
    return [m for m in found if m is not None and m["queue"] == queue]


def test_a_worker_waits_out_a_redis_that_is_down_in_one_line_per_attempt(
    tmp_path, workers, queue, record_dir
):
    server = RedisServer(tmp_path, password="s3cretpw")  # not started: nothing listens yet
    url = server.url(db=5)
    namespace = f"djqt{uuid.uuid4().hex[:8]}"
    w = workers(
        url, "--processes", "1", "--threads", "1", "--queues", queue, broker_options={"namespace": namespace}
    )
    broker = None
    try:
        # Six attempts are 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s apart: a 3-second outage.
        wait_for(lambda: len(attempts(w.output(), queue)) >= 6, timeout=30, message="six failed attempts")
        during = w.output()
        server.start()
        broker = broker_from_url(url, namespace=namespace)
        sent = broker.enqueue(record.message_with_options(args=("back",), queue_name=queue))
        ran = lambda: sent.message_id in {message_id for message_id, _, _ in read_records(record_dir)}  # noqa: E731
        wait_for(ran, timeout=30, message="the message run once Redis is up")
        assert w.stop() == 0
    finally:
        if broker is not None:
            broker.close()
        server.kill()
    log = w.output()

    failed = attempts(during, queue)
    assert 6 <= len(failed) <= 7
    assert [m["attempt"] for m in failed] == [str(n) for n in range(1, len(failed) + 1)]
    assert [float(m["delay"]) for m in failed][:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert {m["broker"] for m in failed} == {f"redis://:***@127.0.0.1:{server.port}/5"}
    # The whole outage in a few lines: the banner, the start, the Redis heartbeat's one
    # warning and the attempts (each attempt was two ERROR lines with a traceback each).
    assert len(during.splitlines()) < 20, during
    assert "Traceback" not in log
    assert "s3cretpw" not in log
    for internal in ("<locals>", "<lambda>", "_ConsumerThread", "will redeliver"):
        assert internal not in log
    assert f"consuming {queue!r} from redis://:***@127.0.0.1:{server.port}/5" in log

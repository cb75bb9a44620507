"""Remove what one benchmark run created, and nothing else.

Every queue, key and exchange a run creates carries its run id, so cleaning up never
touches what other people's tests or runs use on the same servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess

REDIS_DBS = (10, 11, 12, 13)  # counters, djqueue, dramatiq, celery: reserved for benchmarks
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def remove_run(run_id: str) -> None:
    _redis(run_id)
    _rabbitmq(run_id)


def _redis(run_id: str) -> None:
    try:
        import redis

        for db in REDIS_DBS:
            client = redis.Redis(host="127.0.0.1", port=6379, db=db)
            keys = list(client.scan_iter(match=f"*{run_id}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
            # Registries of queue names (djqueue's "<namespace>:queues") name ours too.
            for registry in client.scan_iter(match="*:queues", count=1000):
                if client.type(registry) == b"set":
                    ours = [m for m in client.smembers(registry) if run_id.encode() in m]
                    if ours:
                        client.srem(registry, *ours)
            client.close()
    except Exception as e:
        print(f"cleanup: Redis keys of run {run_id} not removed: {e}")


def _rabbitmq(run_id: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        return
    try:
        import pika

        def names(kind: str) -> list[str]:
            out = subprocess.run(
                ["rabbitmqctl", "-q", kind, "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            return [line.strip() for line in out.splitlines() if run_id in line]

        queues, exchanges = names("list_queues"), names("list_exchanges")
        if not (queues or exchanges):
            return
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            channel.exchange_delete(exchange)
        connection.close()
    except Exception as e:
        print(f"cleanup: RabbitMQ queues of run {run_id} not removed: {e}")

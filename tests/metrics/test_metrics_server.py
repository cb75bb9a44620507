"""The supervisor's metrics endpoint in this process: what a scrape sums."""

from __future__ import annotations

import os
import time
import urllib.request

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from djqueue.metrics import MetricsServer
from tests.process import free_port


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def write_counter(directory: str, pid: int, value: float) -> None:
    """What a worker process's Prometheus middleware leaves in its file."""
    values = MmapedDict(os.path.join(directory, f"counter_{pid}.db"))
    key = mmap_key("djqueue_test", "djqueue_test_total", [], [], "A test counter.")
    values.write_value(key, value, time.time())
    values.close()


def test_a_worker_file_being_created_is_left_out_of_the_scrape(stub_broker):
    server = MetricsServer(free_port(), broker=stub_broker, queues=[], interval=60)
    server.start()
    try:
        write_counter(server.directory, 101, 2.0)
        write_counter(server.directory, 102, 3.0)
        # A worker that has created its file but not yet sized it: a scrape must not
        # fail on it (it used to answer 500), and the other workers' counts still add up.
        open(os.path.join(server.directory, "counter_103.db"), "wb").close()
        assert scrape(server.url)["djqueue_test_total"] == 5.0
    finally:
        server.stop()

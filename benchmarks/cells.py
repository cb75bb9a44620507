"""The workloads: each function runs one cell (one system, one broker, one repetition).

A cell gets fresh queue and counter names, starts its own worker processes and stops
them before it returns, so no cell sees another's messages or warm caches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from .harness import ROOT, WorkerGroup, percentile
from .systems import SYSTEMS

COUNTER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")


@dataclass
class Config:
    run_id: str
    work_dir: Path
    messages: int = 20_000
    db_messages: int = 2_000
    io_jobs: int = 2_000
    latency_count: int = 500
    threads: int = 8
    chunk: int = 1_000
    gap_min: float = 5.0
    gap_max: float = 30.0
    db_gap_max: float = 120.0  # database brokers poll (SQLite, every 100 ms): cover the period
    latency_budget: float = 40.0
    cell_timeout: float = 300.0
    verbose: bool = True
    _serial: list[int] = field(default_factory=lambda: [0])

    def messages_for(self, broker: str) -> int:
        return self.db_messages if broker in ("postgres", "sqlite") else self.messages

    def gap_for(self, broker: str) -> tuple[float, float]:
        return (self.gap_min, self.db_gap_max if broker in ("postgres", "sqlite") else self.gap_max)

    def new_names(self) -> tuple[str, str]:
        self._serial[0] += 1
        n = self._serial[0]
        return f"b{self.run_id}_{n}", f"bench:{self.run_id}:{n}"


class CellError(RuntimeError):
    pass


def cell_env(config: Config, system: str, broker: str, queue: str, key: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_SYSTEM=system,
        BENCH_BROKER=broker,
        BENCH_QUEUE=queue,
        BENCH_KEY=key,
        BENCH_REDIS_URL=COUNTER_URL,
        BENCH_WORK_DIR=str(config.work_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
    )
    env.pop("DJQUEUE_BROKER_URL", None)  # benchmarks.settings picks the URL for the broker
    if system in ("dramatiq", "celery"):
        # Celery's Django fix-up would otherwise set up Django (and djqueue) in its workers.
        env.pop("DJANGO_SETTINGS_MODULE", None)
    else:
        env["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    return env


def last_line(stderr: str) -> str:
    """The exception a failed client ended with (its whole stderr is not kept)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def run_client(env: dict[str, str], system: str, *args: str, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.client", "--system", system, *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CellError(f"client {' '.join(args)} failed: {last_line(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_client(env: dict[str, str], system: str, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "benchmarks.client", "--system", system, *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_client(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise CellError(f"client failed: {last_line(err)}")
    return json.loads(out.strip().splitlines()[-1])


def workers(config: Config, system: str, broker: str, env: dict[str, str], processes: int) -> WorkerGroup:
    queue = env["BENCH_QUEUE"]
    commands = SYSTEMS[system].worker_commands(queue, processes, config.threads, config.run_id)
    log = config.work_dir / "logs" / f"{broker}-{system}-{queue}.log"
    return WorkerGroup(commands, env, log)


def wait_count(
    counter: redis.Redis, key: str, target: int, group: WorkerGroup, timeout: float
) -> tuple[float, float]:
    """Poll the counter until it reaches ``target``; (first seen > 0, reached) wall times."""
    deadline = time.monotonic() + timeout
    first = 0.0
    last_sample = 0.0
    while True:
        value = int(counter.get(key) or 0)
        now = time.time()
        if value and not first:
            first = now
        if value >= target:
            return first, now
        if now - last_sample > 0.25:
            group.sample_rss()
            group.check_alive()
            last_sample = now
        if time.monotonic() > deadline:
            raise CellError(f"only {value} of {target} processed after {timeout:.0f} s")
        time.sleep(0.005)


def enqueue_and_drain(
    config: Config, system: str, broker: str, *, batch: bool, processes: int
) -> dict[str, Any]:
    """Enqueue N no-op messages (timed), then start a worker and time it draining them."""
    n = config.messages_for(broker)
    queue, key = config.new_names()
    env = cell_env(config, system, broker, queue, key)
    counter = redis.Redis.from_url(COUNTER_URL)
    mode = "batch" if batch else "single"
    options = ["--count", str(n), "--chunk", str(config.chunk), "--until-held"]
    sent = run_client(env, system, "--mode", mode, *options, timeout=900)
    enqueue_rate = n / (sent["t1"] - sent["t0"])
    group = workers(config, system, broker, env, processes)
    group.start()
    try:
        first, done = wait_count(counter, f"{key}:count", n, group, config.cell_timeout)
        group.sample_rss()
    finally:
        group.stop()
    processed = int(counter.get(f"{key}:count") or 0)
    counter.delete(f"{key}:count")
    return {
        f"enqueue_{mode}": enqueue_rate,
        f"drain_{processes}x{config.threads}": n / (done - group.started_at),
        f"drain_{processes}x{config.threads}_steady": n / max(done - first, 1e-6),
        f"rss_{processes}x{config.threads}": group.max_process_rss_mib(),
        f"pss_{processes}x{config.threads}": group.max_process_pss_mib(),
        f"duplicates_{processes}x{config.threads}": processed - n,
    }


def io_bound(config: Config, system: str, broker: str) -> dict[str, Any]:
    """2,000 jobs sleeping 50 ms on a warm 1 x 8 worker: throughput against threads / 50 ms."""
    queue, key = config.new_names()
    env = cell_env(config, system, broker, queue, key)
    counter = redis.Redis.from_url(COUNTER_URL)
    result: dict[str, Any] = {}
    if system == "djqueue":
        # The same jobs in plain threads with no queue, in the same cell: the part of the
        # ideal that the job's own Redis call and sleep overshoot take on this machine.
        _, bare_key = config.new_names()
        bare_env = cell_env(config, system, broker, queue, bare_key)
        args = ["--mode", "threads", "--task", "sleepy", "--count", str(config.io_jobs)]
        bare = run_client(bare_env, system, *args, "--threads", str(config.threads), timeout=300)
        ran = int(counter.get(f"{bare_key}:count") or 0)
        counter.delete(f"{bare_key}:count")
        if ran != config.io_jobs:
            raise CellError(f"plain threads ran {ran} of {config.io_jobs} jobs")
        result["io_threads"] = config.io_jobs / (bare["t1"] - bare["t0"])
    group = workers(config, system, broker, env, 1)
    group.start()
    try:
        # One ping through the worker proves it is up before the clock starts.
        run_client(env, system, "--mode", "latency", "--count", "1", "--warmup", "0", timeout=120)
        # Batches of 100, so the first jobs are visible at once rather than after a big batch.
        args = ["--mode", "batch", "--task", "sleepy", "--count", str(config.io_jobs), "--chunk", "100"]
        proc = start_client(env, system, *args)
        try:
            _, done = wait_count(counter, f"{key}:count", config.io_jobs, group, config.cell_timeout)
        finally:
            sent = finish_client(proc, timeout=120)
    finally:
        group.stop()
    counter.delete(f"{key}:count", f"{key}:latency")
    rate = config.io_jobs / (done - sent["t0"])
    ideal = config.threads / 0.05
    result.update(io=rate, io_pct=100 * rate / ideal)
    return result


def latency(config: Config, system: str, broker: str) -> dict[str, Any]:
    """One message at a time to an idle 1 x 8 worker: delay from send to actor start."""
    queue, key = config.new_names()
    env = cell_env(config, system, broker, queue, key)
    group = workers(config, system, broker, env, 1)
    group.start()
    try:
        result = run_client(
            env,
            system,
            "--mode",
            "latency",
            "--count",
            str(config.latency_count),
            "--gap-min",
            str(config.gap_for(broker)[0]),
            "--gap-max",
            str(config.gap_for(broker)[1]),
            "--budget",
            str(config.latency_budget),
            timeout=config.latency_budget + 120,
        )
    finally:
        group.stop()
    redis.Redis.from_url(COUNTER_URL).delete(f"{key}:latency")
    delays = result["delays"]
    return {
        "latency_p50": percentile(delays, 50),
        "latency_p99": percentile(delays, 99),
        "latency_n": len(delays),
    }


WORKLOADS = {
    "enqueue-drain-1": lambda c, s, b: enqueue_and_drain(c, s, b, batch=False, processes=1),
    "enqueue-drain-2": lambda c, s, b: enqueue_and_drain(c, s, b, batch=True, processes=2),
    "io": io_bound,
    "latency": latency,
}

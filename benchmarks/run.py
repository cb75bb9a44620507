"""Run djqueue and its peers side by side: ``python benchmarks/run.py``.

Every cell (system x broker x workload) runs ``--repeat`` times; within a repetition
the systems take turns in a rotating order, so slow drift on a busy machine spreads
over all of them. Raw numbers go to ``benchmarks/.work/results.json``, medians with
min-max and the djqueue/peer ratios to ``benchmarks/RESULTS.md``, and a chart to
``benchmarks/throughput.png``.

``--smoke`` runs every installed system (djqueue alone when the peers of
``requirements/bench.txt`` are not installed) with tiny counts on every broker, and
writes nothing into the repository: CI calls it to keep the harness and every peer's
adapter working.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cells, cleanup, report
from benchmarks.harness import ROOT
from benchmarks.systems import SYSTEMS, djqueue_broker_available

BROKERS = ("redis", "rabbitmq", "postgres", "sqlite")
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts, no files written; every installed system"
    )
    parser.add_argument("--systems", nargs="+", default=None, choices=sorted(SYSTEMS))
    parser.add_argument("--brokers", nargs="+", default=list(BROKERS), choices=BROKERS)
    parser.add_argument(
        "--workloads", nargs="+", default=list(cells.WORKLOADS), choices=list(cells.WORKLOADS)
    )
    parser.add_argument(
        "--all-pairs", action="store_true", help="also Celery on RabbitMQ and django-tasks on SQLite"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every cell (default 3)")
    parser.add_argument(
        "--messages", type=int, default=20_000, help="enqueue/drain messages (Redis, RabbitMQ)"
    )
    parser.add_argument("--db-messages", type=int, default=2_000, help="enqueue/drain messages (database)")
    parser.add_argument("--io-jobs", type=int, default=2_000)
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument(
        "--latency-budget", type=float, default=40.0, help="seconds of latency sampling per cell at most"
    )
    parser.add_argument(
        "--gap",
        type=float,
        nargs=2,
        default=(5.0, 30.0),
        metavar=("MIN", "MAX"),
        help="latency: random idle pause before each send (ms)",
    )
    parser.add_argument(
        "--db-gap-max",
        type=float,
        default=120.0,
        help="latency on the database brokers: pause up to this (ms), to cover the poll period",
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--cell-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--chart", type=Path, default=HERE / "throughput.png")
    parser.add_argument("--work-dir", type=Path, default=HERE / ".work")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only rewrite RESULTS.md and the chart from a results file",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeat, args.messages, args.db_messages = 1, 300, 200
        args.io_jobs, args.latency_count, args.cell_timeout = 40, 20, 60.0
        args.work_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"djqueue-bench-smoke-{os.getpid()}"
        # Never the database of a full run that may be going on at the same time.
        os.environ["BENCH_PG_NAME"] = f"djqueue_bench_smoke_{os.getpid()}"
    args.systems = args.systems or list(SYSTEMS)
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_databases(broker: str, config: cells.Config) -> None:
    """A fresh schema in the benchmark database: its own SQLite file (also the Django
    database of the Redis and RabbitMQ runs), or djqueue_bench."""
    env = cells.cell_env(config, "", broker, "unused", "unused")
    env["BENCH_MIGRATE"] = "1"
    if broker != "postgres":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{config.work_dir / 'bench.sqlite3'}{suffix}").unlink(missing_ok=True)
    else:
        # The benchmark database is ours alone: recreate it so no run sees another's rows.
        pg_admin(f'DROP DATABASE IF EXISTS "{pg_name()}" WITH (FORCE)', f'CREATE DATABASE "{pg_name()}"')
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--settings=benchmarks.settings", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )


def pg_name() -> str:
    return os.environ.get("BENCH_PG_NAME", "djqueue_bench")


def pg_admin(*statements: str) -> None:
    import psycopg

    with psycopg.connect(
        host=os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
        user=os.environ.get("BENCH_PG_USER", "postgres"),
        password=os.environ.get("BENCH_PG_PASSWORD", os.environ.get("DJQUEUE_TEST_PG_PASSWORD", "")),
        dbname="postgres",
        autocommit=True,
    ) as conn:
        for statement in statements:
            conn.execute(statement)


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(broker, systems) pairs that can run here; prints why others are left out."""
    result = []
    for broker in args.brokers:
        systems = []
        for name in args.systems:
            system = SYSTEMS[name]
            if broker not in system.brokers and not (args.all_pairs and broker in system.extra_brokers):
                continue
            why = system.available() or (djqueue_broker_available(broker) if name == "djqueue" else None)
            if why:
                log(f"skipping {name} on {broker}: {why}")
                continue
            systems.append(name)
        if systems:
            result.append((broker, systems))
    return result


def run_cell(
    config: cells.Config, system: str, broker: str, workload: str, rep: int, smoke: bool
) -> dict[str, Any]:
    started = time.monotonic()
    record: dict[str, Any] = {"broker": broker, "system": system, "workload": workload, "rep": rep}
    label = f"{broker} {system} {workload} #{rep}"
    try:
        record.update(cells.WORKLOADS[workload](config, system, broker))
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        log(f"{label}: FAILED {record['error']}")
        if smoke:
            traceback.print_exc()
    else:
        shown = ", ".join(
            f"{k}={v:.1f}" for k, v in record.items() if isinstance(v, float | int) and k != "rep"
        )
        log(f"{label}: {shown} ({time.monotonic() - started:.0f} s)")
    record["load"] = os.getloadavg()[0]
    return record


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    run_id = secrets.token_hex(3)
    config = cells.Config(
        run_id=run_id,
        work_dir=args.work_dir,
        messages=args.messages,
        db_messages=args.db_messages,
        io_jobs=args.io_jobs,
        latency_count=args.latency_count,
        latency_budget=args.latency_budget,
        gap_min=args.gap[0],
        gap_max=args.gap[1],
        db_gap_max=args.db_gap_max,
        threads=args.threads,
        cell_timeout=args.cell_timeout,
    )
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.smoke:
        # Peers run from installed packages, which come with their bytecode; djqueue and
        # the benchmark's own modules run from this checkout: compile them once too, or
        # every djqueue worker would pay for compiling its modules as it boots.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        for package in ("djqueue", "benchmarks"):
            compileall.compile_dir(ROOT / package, quiet=1)
    records: list[dict[str, Any]] = []
    log(f"run {run_id}; logs in {config.work_dir / 'logs'}")
    try:
        for broker, systems in plan(args):
            prepare_databases(broker, config)
            for rep in range(args.repeat):
                for workload in args.workloads:
                    # Rotate who goes first, so no system always gets the quieter moment.
                    order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
                    for system in order:
                        if SYSTEMS[system].workloads is None or workload in SYSTEMS[system].workloads:
                            records.append(run_cell(config, system, broker, workload, rep, args.smoke))
    finally:
        cleanup.remove_run(run_id)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        report.write(data["records"], data["meta"], args.output, args.chart)
        return 0
    started = time.time()
    records = run(args)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "minutes": (time.time() - started) / 60,
        "argv": " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "messages": args.messages,
        "db_messages": args.db_messages,
        "io_jobs": args.io_jobs,
        "latency_count": args.latency_count,
        "latency_budget": args.latency_budget,
        "gap": list(args.gap),
        "db_gap_max": args.db_gap_max,
        "threads": args.threads,
        "versions": report.versions(),
    }
    errors = [r for r in records if "error" in r]
    if args.smoke:
        print(report.smoke_summary(records))
        if "postgres" in args.brokers:
            pg_admin(f'DROP DATABASE IF EXISTS "{pg_name()}" WITH (FORCE)')
        if errors or not records:
            print(f"smoke: {len(errors)} failed cells" if records else "smoke: nothing ran", file=sys.stderr)
            print(f"smoke: worker logs are in {args.work_dir / 'logs'}", file=sys.stderr)
            return 1
        shutil.rmtree(args.work_dir, ignore_errors=True)
        print(f"smoke: {len(records)} passed, 0 failed")
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    report.write(records, meta, args.output, args.chart)
    log(f"wrote {args.output} and {args.chart} in {meta['minutes']:.1f} min")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""python manage.py runworkers: start the worker processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError

from djqueue import __version__, conf
from djqueue.brokers import get_broker
from djqueue.errors import ConfigurationError, ConnectionError
from djqueue.management.tables import WORKER_MODELS, missing_tables
from djqueue.supervisor import Supervisor, WorkerConfig, configure_logging

if TYPE_CHECKING:
    from djqueue.metrics import MetricsServer


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = "Run djqueue worker processes (a supervisor plus N processes of T threads)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--processes",
            "-p",
            type=_positive,
            default=os.cpu_count() or 1,
            help="worker processes (default: the number of CPUs)",
        )
        parser.add_argument(
            "--threads", "-t", type=_positive, default=8, help="threads per process (default 8)"
        )
        parser.add_argument(
            "--queues",
            "-Q",
            nargs="+",
            metavar="QUEUE",
            help="queues to consume (default: every queue an actor or a crontab entry uses)",
        )
        parser.add_argument(
            "--watch",
            nargs="*",
            metavar="DIR",
            default=None,
            help="restart the workers when a .py file under DIR (default: the current directory) changes",
        )
        parser.add_argument("--pid-file", metavar="PATH", help="write the supervisor's pid here")
        parser.add_argument("--log-file", metavar="PATH", help="log here instead of to stderr")
        parser.add_argument(
            "--shutdown-timeout",
            type=_positive,
            default=None,
            metavar="MS",
            help="how long running messages may take to finish on stop "
            "(ms; default DJQUEUE['SHUTDOWN_TIMEOUT'])",
        )
        parser.add_argument(
            "--prefetch",
            type=_positive,
            default=None,
            help="unacked messages per queue and process (default: threads x 2)",
        )
        parser.add_argument(
            "--scheduler",
            action="store_true",
            help="also run the crontab scheduler (DJQUEUE['CRONTABS']) in a process of its own",
        )
        parser.add_argument(
            "--metrics-port",
            type=_positive,
            default=None,
            metavar="PORT",
            help="serve Prometheus metrics of every worker process at http://HOST:PORT/metrics",
        )
        parser.add_argument(
            "--metrics-host",
            default="127.0.0.1",
            metavar="HOST",
            help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0 for all)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        broker = get_broker()
        queues = options["queues"]
        declared = broker.get_declared_queues()
        if queues:
            unknown = sorted(set(queues) - declared)
            if unknown:
                self.stderr.write(
                    f"warning: no actor or crontab entry uses queue(s) {', '.join(unknown)} in this project"
                )
        if not (queues or declared):
            raise CommandError(
                "no queues to consume: no @actor was found. Define actors in your apps' "
                f"{conf.get('TASKS_MODULE')}.py modules or pass --queues."
            )
        problem = missing_tables(broker, WORKER_MODELS + (("ScheduleRun",) if options["scheduler"] else ()))
        if problem is not None:
            raise CommandError(problem)
        for queue_name in sorted(queues or declared):
            # Before any worker starts: a queue the broker refuses stops the command here.
            try:
                broker.ensure_queue(queue_name)
            except ConfigurationError as e:
                raise CommandError(str(e)) from None
            except ConnectionError as e:
                self.stderr.write(f"warning: {e}; the workers keep trying to connect")
                break
        config = WorkerConfig(
            threads=options["threads"],
            queues=queues,
            shutdown_timeout=options["shutdown_timeout"] or conf.get("SHUTDOWN_TIMEOUT"),
            log_file=options["log_file"],
            log_level="DEBUG" if options["verbosity"] >= 3 else "INFO",
            prefetch=options["prefetch"],
            metrics=options["metrics_port"] is not None,
        )
        configure_logging(config.log_file, config.log_level)
        watch = None
        if options["watch"] is not None:
            watch = [Path(d).resolve() for d in options["watch"]] or [Path.cwd()]
            missing = [str(d) for d in watch if not d.is_dir()]
            if missing:
                raise CommandError(f"--watch: no such directory: {', '.join(missing)}")
        metrics = self._start_metrics(options, broker, queues or declared)
        self.stdout.write(
            f"djqueue {__version__} | broker {broker.describe()} | "
            f"queues {', '.join(sorted(queues or declared))} | {len(broker.actors)} actors | "
            f"{options['processes']} processes x {options['threads']} threads | pid {os.getpid()}"
            + (" | watching for code changes" if watch else "")
            + (" | with the scheduler" if options["scheduler"] else "")
            + (f" | metrics {metrics.url}" if metrics else "")
        )
        self.stdout.flush()
        supervisor = Supervisor(
            config,
            processes=options["processes"],
            pid_file=options["pid_file"],
            watch=watch,
            on_worker_exit=metrics.process_exited if metrics else None,
            extra_processes=self._extra_processes(options, config),
        )
        try:
            code = supervisor.run()
        finally:
            if metrics:
                metrics.stop()
        if code:
            raise SystemExit(code)

    def _extra_processes(self, options: dict[str, Any], config: WorkerConfig) -> list[Any]:
        if not options["scheduler"]:
            return []
        from djqueue.scheduling.scheduler import scheduler_process_main

        return [("scheduler", scheduler_process_main, (config.log_file, config.log_level, os.getpid()))]

    def _start_metrics(
        self, options: dict[str, Any], broker: Any, queues: list[str] | set[str]
    ) -> MetricsServer | None:
        if options["metrics_port"] is None:
            return None
        from djqueue.metrics import MetricsServer

        server = MetricsServer(
            options["metrics_port"], host=options["metrics_host"], broker=broker, queues=queues
        )
        try:
            server.start()
        except ImportError as e:
            raise CommandError(str(e))
        except OSError as e:
            raise CommandError(f"cannot serve metrics on {server.url}: {e}; choose another --metrics-port")
        return server

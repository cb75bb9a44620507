"""python manage.py runscheduler: fire DJQUEUE["CRONTABS"] on time."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from djqueue import __version__
from djqueue.errors import ActorNotFound, ConfigurationError
from djqueue.management.tables import missing_tables
from djqueue.scheduling import checks as _checks  # noqa: F401 - the crontab checks run before handle()
from djqueue.scheduling.scheduler import Scheduler, format_listing, install_signal_handlers, load_entries
from djqueue.supervisor import configure_logging


class Command(BaseCommand):
    help = "Fire the crontabs of DJQUEUE['CRONTABS'] on time (any number may run side by side)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--list", action="store_true", help="print each entry's next five fire times and exit"
        )
        parser.add_argument("--log-file", metavar="PATH", help="log here instead of to stderr")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            entries = load_entries()
            if options["list"]:
                self.stdout.write(format_listing(entries, datetime.now(UTC)))
                return
            configure_logging(options["log_file"], "DEBUG" if options["verbosity"] >= 3 else "INFO")
            scheduler = Scheduler(entries)
        except (ConfigurationError, ActorNotFound) as e:
            raise CommandError(str(e)) from None
        problem = missing_tables(scheduler.broker, ("ScheduleRun",))
        if problem is not None:
            raise CommandError(problem)
        stop = threading.Event()
        install_signal_handlers(stop)
        self.stdout.write(
            f"djqueue {__version__} scheduler | broker {scheduler.broker.describe()} | "
            f"{sum(e.enabled for e in entries)} crontabs | pid {os.getpid()}"
        )
        self.stdout.flush()
        scheduler.run(stop)

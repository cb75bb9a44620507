"""python manage.py queuestats: what is waiting, delayed, running and dead, per queue."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from djqueue.dashboard import QueueRow, queue_overview

COLUMNS = (
    ("queue", "queue_name"),
    ("ready", "ready"),
    ("delayed", "delayed"),
    ("in flight", "in_flight"),
    ("dead (broker)", "dead"),
    ("dead letters", "dead_letters"),
)


class Command(BaseCommand):
    help = (
        "Show, per queue, the ready, delayed and in-flight messages and the dead letters "
        "(kept by the broker, and DeadLetter rows still to retry or discard)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.add_argument(
            "--queues",
            "-Q",
            nargs="+",
            metavar="QUEUE",
            help="only these queues (default: every queue actors or crontab entries use, workers "
            "consume or dead letters name)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        rows = queue_overview(queues=options["queues"])
        if options["json"]:
            self.stdout.write(json.dumps({"queues": [row.asdict() for row in rows]}, indent=2))
        else:
            self.write_table(rows)
        failed = [row for row in rows if row.error]
        if failed:
            raise CommandError(
                "the broker did not answer for "
                + "; ".join(f"queue {row.queue_name}: {row.error}" for row in failed)
            )

    def write_table(self, rows: list[QueueRow]) -> None:
        if not rows:
            self.stdout.write("no queues: no actor is declared and no worker has reported in")
            return
        table = [[title for title, _ in COLUMNS]]
        for row in rows:
            values = row.asdict()
            cells = [row.queue_name]
            for _, key in COLUMNS[1:]:
                value = values[key]
                cells.append("?" if value is None else str(value))
            table.append(cells)
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
        for n, line in enumerate(table):
            cells = [line[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
            ]
            self.stdout.write("  ".join(cells).rstrip())
            if n == 0:
                self.stdout.write("  ".join("-" * w for w in widths))

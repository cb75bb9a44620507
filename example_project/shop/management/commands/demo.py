"""python manage.py demo: enqueue the shop's jobs, run real workers, show what happened."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from djqueue.models import DeadLetter
from example_project.shop.models import Order
from example_project.shop.tasks import charge_card, remind_abandoned_cart, send_receipt

REMINDER_DELAY = 2_000  # ms


class Command(BaseCommand):
    help = "Enqueue a few shop jobs, run `runworkers` until they are done, and print the outcome."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the jobs")

    def handle(self, *args: Any, **options: Any) -> None:
        paid = Order.objects.create(email="ada@example.com", total_cents=4200)
        declined = Order.objects.create(email="bob@example.com", total_cents=1999)
        abandoned = Order.objects.create(email="cy@example.com", total_cents=500)

        receipt = send_receipt.send(paid.pk)
        charge_card.send(paid.pk, "tok_visa")
        bad_charge = charge_card.send(declined.pk, "tok_chargeDeclined")
        reminder_sent = timezone.now()
        remind_abandoned_cart.send_with_options(args=(abandoned.pk,), delay=REMINDER_DELAY)
        self.stdout.write(
            "Enqueued 4 jobs on the database broker: a receipt, two card charges (one will be "
            f"declined) and a cart reminder delayed by {REMINDER_DELAY / 1000:.0f} s.\n"
            "Starting `runworkers --processes 1 --threads 4` ..."
        )
        workers = subprocess.Popen(self._runworkers_command(), stdin=subprocess.DEVNULL)
        try:
            self._wait(paid, declined, abandoned, bad_charge.message_id, options["timeout"])
        finally:
            workers.send_signal(signal.SIGTERM)
            code = workers.wait(60)
        paid.refresh_from_db()
        abandoned.refresh_from_db()
        dead = DeadLetter.objects.get(message_id=bad_charge.message_id)
        waited = (abandoned.reminder_sent_at - reminder_sent).total_seconds()
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(f"  ok   send_receipt ran ({receipt.message_id})"))
        self.stdout.write(self.style.SUCCESS(f"  ok   charge_card charged order #{paid.pk}"))
        self.stdout.write(
            self.style.WARNING(
                f"  dead charge_card for order #{declined.pk}: {dead.exception_type}: "
                f"{dead.exception_message.splitlines()[0]}\n"
                "       kept as a DeadLetter row; retry it from /admin/djqueue/deadletter/"
            )
        )
        self.stdout.write(
            self.style.SUCCESS(f"  ok   remind_abandoned_cart ran {waited:.1f} s after it was sent")
        )
        self.stdout.write(f"Workers stopped with exit code {code} after SIGTERM.")
        if code != 0:
            raise CommandError(f"runworkers exited with {code}")

    def _runworkers_command(self) -> list[str]:
        args = ["runworkers", "--processes", "1", "--threads", "4"]
        if sys.argv and sys.argv[0].endswith("manage.py"):
            return [sys.executable, sys.argv[0], *args]
        return [sys.executable, "-m", "django", *args, f"--settings={settings.SETTINGS_MODULE}"]

    def _wait(self, paid: Order, declined: Order, abandoned: Order, bad_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            paid.refresh_from_db()
            abandoned.refresh_from_db()
            if (
                paid.receipt_sent_at
                and paid.charged_at
                and abandoned.reminder_sent_at
                and DeadLetter.objects.filter(message_id=bad_id).exists()
            ):
                return
            time.sleep(0.2)
        raise CommandError(f"the jobs did not finish within {timeout} s; is the worker running?")

"""The shop's background jobs. djqueue finds this module because the app is installed."""

from __future__ import annotations

import logging

from django.utils import timezone

from djqueue import actor

from .models import Order

logger = logging.getLogger(__name__)


class PaymentDeclined(Exception):
    """The card was declined: retrying will not help, so the job goes straight to the
    dead letters, where an operator can look at it and retry it from the admin."""


@actor
def send_receipt(order_id: int) -> str:
    order = Order.objects.get(pk=order_id)
    # A real shop would send an e-mail here.
    Order.objects.filter(pk=order_id).update(receipt_sent_at=timezone.now())
    return f"receipt for order #{order_id} sent to {order.email}"


@actor(queue_name="payments", throws=(PaymentDeclined,), max_retries=3)
def charge_card(order_id: int, payment_token: str) -> None:
    # The payment provider's token, never the card number: a job's arguments are stored
    # in the queue and in dead letters, and shown in logs and the admin.
    if payment_token == "tok_chargeDeclined":
        raise PaymentDeclined(f"the card of order #{order_id} was declined ({payment_token})")
    Order.objects.filter(pk=order_id).update(charged_at=timezone.now())


@actor
def remind_abandoned_cart(order_id: int) -> None:
    Order.objects.filter(pk=order_id, charged_at__isnull=True).update(reminder_sent_at=timezone.now())


@actor(queue_name="reports", time_limit=60_000)
def build_daily_report() -> dict[str, int]:
    today = timezone.localdate()
    orders = Order.objects.filter(created_at__date=today)
    return {"orders": orders.count(), "charged": orders.filter(charged_at__isnull=False).count()}

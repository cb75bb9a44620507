"""The admin dashboard: queues, live workers and the last hour's throughput, read-only.

Include its URL before the admin's own, so that the admin's catch-all does not answer
first::

    urlpatterns = [
        path("admin/djqueue/dashboard/", include("djqueue.dashboard")),
        path("admin/", admin.site.urls),
    ]

The page is for active staff members who may view dead letters
(``djqueue.view_deadletter``). Its numbers come from the broker
(``get_queue_stats``), ``DeadLetter`` rows, and the ``WorkerHeartbeat`` and
``ThroughputMinute`` rows that worker processes write (``middleware/heartbeats.py``).
``queue_overview()`` also serves ``manage.py queuestats``.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_safe

from .middleware.heartbeats import HEARTBEAT_INTERVAL

# A worker whose heartbeat is older than this is shown as dead.
STALE_AFTER = dt.timedelta(seconds=HEARTBEAT_INTERVAL * 6)
CHART_MINUTES = 60
REFRESH_CHOICES = (0, 5, 10, 30, 60)  # seconds; 0 = no automatic refresh


@dataclass(frozen=True)
class QueueRow:
    """One queue's counts. The broker's are None when it could not be asked (``error``)."""

    queue_name: str
    ready: int | None
    delayed: int | None
    in_flight: int | None
    dead: int | None
    dead_letters: int
    error: str = ""

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


def queue_names(broker: Any) -> list[str]:
    """Every queue worth showing: those actors use, those live workers consume, and
    those that have dead letters waiting."""
    from .models import DeadLetter, WorkerHeartbeat

    names = set(broker.get_declared_queues())
    for queues in WorkerHeartbeat.objects.values_list("queues", flat=True):
        names.update(q for q in queues or () if isinstance(q, str))
    names.update(DeadLetter.objects.dead().values_list("queue_name", flat=True).distinct())
    return sorted(name for name in names if name)


def queue_overview(broker: Any = None, queues: list[str] | None = None) -> list[QueueRow]:
    """Ready, delayed, in-flight and dead counts per queue from the broker, and the
    ``DeadLetter`` rows still dead, for ``queues`` (default: ``queue_names()``)."""
    from .brokers import get_broker
    from .models import DeadLetter

    broker = broker or get_broker()
    names = queues if queues is not None else queue_names(broker)
    dead_letters = dict(
        DeadLetter.objects.dead()
        .filter(queue_name__in=names)
        .order_by()
        .values_list("queue_name")
        .annotate(n=Count("pk"))
    )
    rows = []
    for name in names:
        try:
            stats = broker.get_queue_stats(name)
        except Exception as e:
            rows.append(QueueRow(name, None, None, None, None, dead_letters.get(name, 0), str(e) or repr(e)))
            continue
        rows.append(QueueRow(name, *stats, dead_letters=dead_letters.get(name, 0)))
    return rows


def workers(now: dt.datetime) -> list[dict[str, Any]]:
    """Worker processes with a heartbeat row, each marked alive or not."""
    from .models import WorkerHeartbeat

    return [
        {
            "heartbeat": row,
            "alive": now - row.last_seen <= STALE_AFTER,
            "seen_ago": max(0, int((now - row.last_seen).total_seconds())),
        }
        for row in WorkerHeartbeat.objects.all()
    ]


def throughput(now: dt.datetime, minutes: int = CHART_MINUTES) -> list[tuple[dt.datetime, int, int]]:
    """(minute, processed, failed) for each of the last ``minutes`` minutes, oldest first."""
    from .models import ThroughputMinute

    last = now.astimezone(dt.UTC).replace(second=0, microsecond=0)
    first = last - dt.timedelta(minutes=minutes - 1)
    counts = {
        minute: (processed, failed)
        for minute, processed, failed in ThroughputMinute.objects.filter(minute__gte=first).values_list(
            "minute", "processed", "failed"
        )
    }
    points = []
    for i in range(minutes):
        minute = first + dt.timedelta(minutes=i)
        processed, failed = counts.get(minute, (0, 0))
        points.append((minute, processed, failed))
    return points


def _nice_step(value: float) -> int:
    """The smallest of 1, 2, 5 x 10^k that is >= ``value`` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


def chart(
    points: list[tuple[dt.datetime, int, int]], *, width: int = 960, height: int = 240
) -> dict[str, Any]:
    """The geometry of a bar chart of ``points``, drawn as inline SVG by the template:
    one bar per minute for processed messages, with the failed ones over it in red."""
    left, right, top, bottom = 48, 8, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    step = _nice_step(max((p for _, p, _ in points), default=0) / 4)
    y_max = step * 4
    slot = plot_w / max(len(points), 1)
    bar_w = round(max(slot * 0.72, 1), 2)
    bars, labels = [], []
    for i, (minute, processed, failed) in enumerate(points):
        x = left + i * slot + (slot - bar_w) / 2
        local = timezone.localtime(minute)
        p_h = processed / y_max * plot_h
        f_h = failed / y_max * plot_h
        bars.append(
            {
                "x": round(x, 2),
                "processed_y": round(top + plot_h - p_h, 2),
                "processed_h": round(p_h, 2),
                "failed_y": round(top + plot_h - f_h, 2),
                "failed_h": round(f_h, 2),
                "title": f"{local:%H:%M}: {processed} processed, {failed} failed",
            }
        )
        if local.minute % 10 == 0:
            labels.append({"x": round(left + i * slot + slot / 2, 2), "text": f"{local:%H:%M}"})
    gridlines = [
        {"y": round(top + plot_h - i * step / y_max * plot_h, 2), "value": i * step} for i in range(5)
    ]
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "baseline": top + plot_h,
        "label_y": height - 8,
        "bar_width": bar_w,
        "bars": bars,
        "labels": labels,
        "gridlines": gridlines,
        "processed": sum(p for _, p, _ in points),
        "failed": sum(f for _, _, f in points),
    }


def dashboard_context(now: dt.datetime | None = None, broker: Any = None) -> dict[str, Any]:
    """Everything the dashboard shows."""
    from .brokers import get_broker

    now = now or timezone.now()
    broker = broker or get_broker()
    worker_rows = workers(now)
    return {
        "now": now,
        "broker_description": broker.describe(),
        "queues": queue_overview(broker),
        "workers": worker_rows,
        "alive_workers": sum(1 for w in worker_rows if w["alive"]),
        "chart": chart(throughput(now)),
        "stale_after": int(STALE_AFTER.total_seconds()),
    }


@require_safe
def dashboard_view(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm("djqueue.view_deadletter"):
        raise PermissionDenied
    try:
        refresh = int(request.GET.get("refresh", 0))
    except ValueError:
        refresh = 0
    context = {
        **admin.site.each_context(request),
        **dashboard_context(),
        "title": "Background jobs",
        "app_label": "djqueue",
        "refresh": refresh if refresh in REFRESH_CHOICES else 0,
        "refresh_choices": REFRESH_CHOICES,
    }
    return TemplateResponse(request, "admin/djqueue/dashboard.html", context)


# admin_view: active staff only (others are sent to the admin login), never cached.
urlpatterns = [path("", admin.site.admin_view(dashboard_view), name="djqueue_dashboard")]

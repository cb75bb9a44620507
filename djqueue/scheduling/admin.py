"""The schedule screens: ScheduleRun rows (read-only), and the configured crontabs with
their next fire times (``/admin/djqueue/schedulerun/schedules/``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Max
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from .. import conf
from ..errors import ConfigurationError
from ..models import ScheduleRun
from . import checks as _checks  # noqa: F401 - registers the crontab checks
from .crontab import CrontabEntry
from .scheduler import default_timezone

try:  # the shared admin helpers, for large tables
    from ..admin.helpers import LargeTablePaginator, make_values_filter

    _name_filter: Any = make_values_filter("name", "schedule")
    _paginator: Any = LargeTablePaginator
except ImportError:  # pragma: no cover - only while the admin package is absent
    from django.core.paginator import Paginator

    _name_filter, _paginator = "name", Paginator

UPCOMING = 5


@admin.register(ScheduleRun)
class ScheduleRunAdmin(admin.ModelAdmin):
    list_display = ("name", "fire_time", "message_id", "enqueued_at", "delay")
    list_filter = (_name_filter, "fire_time", "enqueued_at")
    search_fields = ("=name", "=message_id")
    search_help_text = "A whole schedule name or message id."
    date_hierarchy = "fire_time"
    list_per_page = 50
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = _paginator
    fields = ("name", "fire_time", "message_id", "enqueued_at")
    readonly_fields = fields
    change_list_template = "admin/djqueue/schedule/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The scheduler prunes old rows itself, and keeps each entry's latest on purpose.
        return False

    @admin.display(description="enqueued after")
    def delay(self, obj: ScheduleRun) -> str:
        seconds = (obj.enqueued_at - obj.fire_time).total_seconds()
        return f"{seconds:.3f} s"

    def get_urls(self) -> list[Any]:
        view = self.admin_site.admin_view(self.schedules_view)
        return [path("schedules/", view, name="djqueue_schedulerun_schedules"), *super().get_urls()]

    def schedules_view(self, request: HttpRequest) -> HttpResponse:
        """The entries of DJQUEUE["CRONTABS"], each with its next fire times and last run."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Configured schedules",
            "opts": self.model._meta,
            "entries": schedule_rows(datetime.now(UTC)),
        }
        return TemplateResponse(request, "admin/djqueue/schedule/schedules.html", context)


def schedule_rows(now: datetime) -> list[dict[str, Any]]:
    """One dict per configured entry, for the schedules page; a bad entry shows its error."""
    crontabs = conf.get("CRONTABS")
    if not isinstance(crontabs, dict):
        return []
    last_runs = dict(
        ScheduleRun.objects.filter(name__in=[str(n) for n in crontabs])
        .values("name")
        .annotate(last=Max("fire_time"))
        .values_list("name", "last")
    )
    rows = []
    for name, value in crontabs.items():
        row: dict[str, Any] = {"name": name, "last_run": last_runs.get(name)}
        try:
            entry = CrontabEntry.from_setting(name, value, default_timezone=default_timezone())
        except ConfigurationError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row.update(
            actor=entry.actor,
            schedule=entry.schedule.expression,
            timezone=entry.timezone,
            queue_name=entry.queue_name or "",
            enabled=entry.enabled,
            catch_up=entry.catch_up,
            arguments=_arguments(entry),
            next_fire_times=entry.next_fire_times(now, UPCOMING) if entry.enabled else [],
        )
        if row["last_run"] is not None:
            row["last_run"] = row["last_run"].astimezone(entry.zone)
        rows.append(row)
    return rows


def _arguments(entry: CrontabEntry) -> str:
    parts = [repr(a) for a in entry.args] + [f"{k}={v!r}" for k, v in entry.kwargs.items()]
    return ", ".join(parts)

"""The results screen: read-only."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin
from django.db.models.functions import Substr
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.text import Truncator

from ..models import TaskResult
from .helpers import (
    LargeTableAdminMixin,
    compact_time,
    make_values_filter,
    pre,
    pretty_json,
    redact,
    short_id,
)

LIST_COLUMNS = (
    "pk",
    "message_id",
    "actor_name",
    "queue_name",
    "status",
    "exception_type",
    "finished_at",
    "expires_at",
)


@admin.register(TaskResult)
class TaskResultAdmin(LargeTableAdminMixin, admin.ModelAdmin):
    list_display = ("message_short", "actor_name", "queue", "status", "outcome", "finished", "expires")
    list_display_links = ("message_short",)
    list_filter = ("status", make_values_filter("actor_name", "actor"), "finished_at")
    search_fields = ("actor_name", "exception_type")
    search_help_text = "A message or group id (fast), or text in the actor name or exception type."
    date_hierarchy = "finished_at"
    fields = (
        "message_id",
        "actor_name",
        "queue_name",
        "status",
        "result_display",
        "exception_type",
        "exception_display",
        "group_id",
        "created_at",
        "finished_at",
        "expires_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Expired results are deleted by `manage.py purgeresults`, in batches.
        return False

    def get_queryset(self, request: HttpRequest) -> Any:
        queryset = super().get_queryset(request)
        match = request.resolver_match
        if match is not None and match.url_name == "djqueue_taskresult_changelist":
            # The list shows a preview; whole results can be large.
            queryset = queryset.only(*LIST_COLUMNS).annotate(exception_preview=Substr("exception", 1, 120))
        return queryset

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        term = search_term.strip()
        try:
            uuid.UUID(term)
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        # Two index lookups instead of a scan.
        return queryset.filter(message_id=term) | queryset.filter(group_id=term), False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        return super().changelist_view(request, {"title": "Task results", **(extra_context or {})})

    @admin.display(description="message", ordering="message_id")
    def message_short(self, obj: TaskResult) -> str:
        return short_id(obj.message_id)

    @admin.display(description="queue", ordering="queue_name")
    def queue(self, obj: TaskResult) -> str:
        return obj.queue_name

    @admin.display(description="finished at", ordering="finished_at")
    def finished(self, obj: TaskResult) -> str:
        return compact_time(obj.finished_at)

    @admin.display(description="expires at", ordering="expires_at")
    def expires(self, obj: TaskResult) -> str:
        return compact_time(obj.expires_at)

    @admin.display(description="exception")
    def outcome(self, obj: TaskResult) -> str:
        if obj.status != TaskResult.Status.FAILED:
            return ""
        text = Truncator(redact(getattr(obj, "exception_preview", None) or "", cut=True)).chars(60)
        return format_html('<code class="djq-nowrap">{}</code> {}', obj.exception_type, text)

    @admin.display(description="result")
    def result_display(self, obj: TaskResult) -> str:
        return pretty_json(obj.result) if obj.status == TaskResult.Status.SUCCEEDED else "—"

    @admin.display(description="exception message")
    def exception_display(self, obj: TaskResult) -> str:
        return pre(obj.exception) if obj.exception else "—"

"""The results screen: read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from ..models import TaskResult
from .base import MessageRowsAdmin, exception_summary, time_column
from .helpers import make_values_filter, pre, pretty_json

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
class TaskResultAdmin(MessageRowsAdmin):
    list_display = ("message_short", "actor_name", "queue", "status", "outcome", "finished", "expires")
    list_display_links = ("message_short",)
    list_filter = ("status", make_values_filter("actor_name", "actor"), "finished_at")
    search_fields = ("actor_name", "exception_type")
    search_help_text = "A message or group id (fast), or text in the actor name or exception type."
    date_hierarchy = "finished_at"
    changelist_title = "Task results"
    # The list shows a preview; whole results can be large.
    list_columns = LIST_COLUMNS
    preview_field = "exception"
    id_search_fields = ("message_id", "group_id")
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

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    finished = time_column("finished_at", "finished at")
    expires = time_column("expires_at", "expires at")

    @admin.display(description="exception")
    def outcome(self, obj: TaskResult) -> str:
        if obj.status != TaskResult.Status.FAILED:
            return ""
        return exception_summary(obj.exception_type, getattr(obj, "exception_preview", None) or "")

    @admin.display(description="result")
    def result_display(self, obj: TaskResult) -> str:
        return pretty_json(obj.result) if obj.status == TaskResult.Status.SUCCEEDED else "—"

    @admin.display(description="exception message")
    def exception_display(self, obj: TaskResult) -> str:
        return pre(obj.exception) if obj.exception else "—"

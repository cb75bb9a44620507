"""The screen of django.tasks results (DjangoTaskResult rows, written by
``djqueue.backends.DjqueueTaskBackend``): read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html_join

from ..models import DjangoTaskResult
from .base import MessageRowsAdmin, id_column, json_display, time_column
from .helpers import dotted, pretty_json, redact

# Columns the list needs; arguments, return values and tracebacks stay in the database.
LIST_COLUMNS = ("id", "task_path", "queue_name", "status", "enqueued_at", "started_at", "finished_at")


@admin.register(DjangoTaskResult)
class DjangoTaskResultAdmin(MessageRowsAdmin):
    list_display = ("message_short", "task", "queue", "status", "enqueued", "started", "finished")
    list_display_links = ("message_short",)
    # Only filters that need no index beyond the primary key: the table has no other.
    list_filter = ("status",)
    search_fields = ("=id", "task_path")
    search_help_text = "A task result id (fast), or text in the task's import path (reads every row)."
    changelist_title = "Django task results"
    list_columns = LIST_COLUMNS
    id_search_fields = ("id",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "task_path",
                    "backend",
                    "queue_name",
                    "priority",
                    "status",
                    "worker_ids",
                )
            },
        ),
        (
            "Times",
            {
                "fields": (
                    "run_after",
                    "enqueued_at",
                    "started_at",
                    "last_attempted_at",
                    "finished_at",
                    "expires_at",
                )
            },
        ),
        ("Arguments", {"fields": ("args_display", "kwargs_display")}),
        ("Outcome", {"fields": ("return_value_display", "errors_display")}),
    )

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    message_short = id_column("id", "id")
    enqueued = time_column("enqueued_at", "enqueued at")
    started = time_column("started_at", "started at")
    finished = time_column("finished_at", "finished at")
    args_display = json_display("args")
    kwargs_display = json_display("kwargs")

    @admin.display(description="task", ordering="task_path")
    def task(self, obj: DjangoTaskResult) -> str:
        return dotted(obj.task_path)

    @admin.display(description="return value")
    def return_value_display(self, obj: DjangoTaskResult) -> str:
        if obj.status != DjangoTaskResult.Status.SUCCESSFUL:
            return "—"
        return pretty_json(obj.return_value)

    @admin.display(description="errors")
    def errors_display(self, obj: DjangoTaskResult) -> str:
        """Every failed attempt's exception class and traceback, oldest first."""
        if not obj.errors:
            return "—"
        return format_html_join(
            "",
            '<p><code>{}</code></p><pre class="djq-pre">{}</pre>',
            (
                (error.get("exception_class_path", "?"), redact(error.get("traceback", "")))
                for error in obj.errors
            ),
        )

"""The base of djqueue's screens of rows keyed by a message id (dead letters, results,
django.tasks results): read-only rows in a list built for large tables."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.contrib import admin
from django.db.models import Q
from django.db.models.functions import Substr
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.text import Truncator

from .helpers import LargeTableAdminMixin, compact_time, pretty_json, redact, short_id

# Characters of ``preview_field`` that the list reads; the column shows 60 of them.
PREVIEW_LENGTH = 120


def id_column(field: str = "message_id", description: str = "message") -> Callable[[Any, Any], str]:
    """A list column showing the start of the id in ``field`` (see short_id)."""

    @admin.display(description=description, ordering=field)
    def column(self: Any, obj: Any) -> str:
        return short_id(getattr(obj, field))

    return column


def time_column(field: str, description: str) -> Callable[[Any, Any], str]:
    """A list column showing the date-time in ``field`` compactly (see compact_time)."""

    @admin.display(description=description, ordering=field)
    def column(self: Any, obj: Any) -> str:
        return compact_time(getattr(obj, field))

    return column


def json_display(field: str, description: str = "") -> Callable[[Any, Any], str]:
    """A change-page field showing the JSON in ``field``, indented and escaped."""

    @admin.display(description=description or field)
    def display(self: Any, obj: Any) -> str:
        return pretty_json(getattr(obj, field))

    return display


class MessageRowsAdmin(LargeTableAdminMixin, admin.ModelAdmin):
    """Rows written by workers, which nobody adds or deletes in the admin.

    - ``changelist_title``: the list's title.
    - ``list_columns``: the only columns the list reads; JSON, tracebacks and the like
      stay in the database.
    - ``preview_field``: a text column of which the list reads the first
      ``PREVIEW_LENGTH`` characters, as ``exception_preview``; empty for none.
    - ``id_search_fields``: indexed id columns. A search for a whole uuid is an exact
      lookup in each (one index lookup each) instead of a scan of ``search_fields``.

    Every field of the page is read-only; subclasses declare ``fields`` or ``fieldsets``.
    """

    changelist_title = ""
    list_columns: tuple[str, ...] = ()
    preview_field = ""
    id_search_fields: tuple[str, ...] = ("message_id",)

    message_short = id_column()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Old rows are deleted by the purge commands, in batches.
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f for _, section in self.get_fieldsets(request, obj) for f in section["fields"]]

    def get_queryset(self, request: HttpRequest) -> Any:
        queryset = super().get_queryset(request)
        match = request.resolver_match
        opts = self.opts
        if match is not None and match.url_name == f"{opts.app_label}_{opts.model_name}_changelist":
            if self.list_columns:
                queryset = queryset.only(*self.list_columns)
            if self.preview_field:
                queryset = queryset.annotate(exception_preview=Substr(self.preview_field, 1, PREVIEW_LENGTH))
        return queryset

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        term = search_term.strip()
        try:
            uuid.UUID(term)
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        lookups = Q()
        for field in self.id_search_fields:
            lookups |= Q(**{field: term})
        return queryset.filter(lookups), False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        title = {"title": self.changelist_title} if self.changelist_title else {}
        return super().changelist_view(request, {**title, **(extra_context or {})})

    @admin.display(description="queue", ordering="queue_name")
    def queue(self, obj: Any) -> str:
        return obj.queue_name


def exception_summary(exception_type: str, text: str) -> str:
    """An exception's type and the start of its message, for a list column: escaped,
    with any password masked even where the preview ends inside it."""
    preview = Truncator(redact(text, cut=True)).chars(60)
    return format_html('<code class="djq-nowrap">{}</code> {}', exception_type, preview)

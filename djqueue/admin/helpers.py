"""Pieces shared by djqueue's admin screens: fast counts and filters on large
tables, and safe rendering of user data (escaped, secrets masked)."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Max, Min
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.text import capfirst
from django.utils.translation import gettext

# user:password@ in any URL, e.g. a broker URL quoted in an exception message. The
# password runs to the last "@" of the authority, as it may hold an unencoded "@".
_URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^\s/]*@")
# The same, cut off before its "@" by a preview that ends inside the password.
_CUT_URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^\s/@]+$")


def redact(text: str, *, cut: bool = False) -> str:
    """``text`` with the password of any URL in it replaced by ``***``. ``cut``: the
    text is the start of a longer one, which may end in the middle of a password."""
    text = _URL_PASSWORD.sub(r"\g<prefix>:***@", text)
    return _CUT_URL_PASSWORD.sub(r"\g<prefix>:***", text) if cut else text


def pre(text: str) -> str:
    """``text`` in a <pre> block: escaped, passwords masked."""
    return format_html('<pre class="djq-pre">{}</pre>', redact(text))


def pretty_json(value: Any) -> str:
    return pre(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str))


class LargeTablePaginator(Paginator):
    """A paginator that does not COUNT(*) a huge table for every page.

    It first reads the requested page (plus one row), which it then serves: when that
    is the last page the count follows from it, so a rare search term costs one scan,
    not two. Otherwise it counts at most ``count_limit`` rows. Past that the count is
    PostgreSQL's planner estimate, or elsewhere a lower bound ("at least"), which grows
    as one pages on; ``count_note`` says which, for the template.
    """

    count_limit = 1000

    def __init__(
        self, object_list: Any, per_page: int, *args: Any, page_number: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(object_list, per_page, *args, **kwargs)
        self.page_number = max(1, page_number)
        self.count_note = ""
        self._rows: list[Any] | None = None

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        offset = (self.page_number - 1) * self.per_page
        rows = list(self.object_list[offset : offset + self.per_page + 1])
        if rows or offset == 0:
            self._rows = rows[: self.per_page]  # page() serves them without a second query
        if len(rows) <= self.per_page and (rows or offset == 0):
            return offset + len(rows)
        queryset = self.object_list.order_by().values("pk")
        bounded = queryset[: self.count_limit + 1].count()
        if bounded <= self.count_limit:
            return bounded
        at_least = max(bounded, offset + len(rows))
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            self.count_note = "at least "
            return at_least
        sql, params = queryset.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
        if isinstance(plan, str):
            plan = json.loads(plan)
        self.count_note = "about "
        return max(int(plan[0]["Plan"]["Plan Rows"]), at_least)

    def page(self, number: Any) -> Any:
        number = self.validate_number(number)
        if number == self.page_number and self._rows is not None:
            return self._get_page(self._rows, number, self)  # already read by count
        return super().page(number)


class FastChangeList(ChangeList):
    """A ChangeList whose date hierarchy never groups the whole table by date.

    Django's lists the years (months, days) that have rows with SELECT DISTINCT over
    every matching row. This one links every period between the first and the last
    row of the table, found with two index lookups; a period may turn out empty.
    """

    def get_results(self, request: Any) -> None:
        super().get_results(request)
        rows = getattr(self.paginator, "_rows", None)
        if rows is not None and not self.multi_page and not self.show_all:
            # A single page: Django would run the query again; the paginator has the rows.
            self.result_list = rows

    def fast_date_hierarchy(self) -> dict[str, Any]:
        field = self.date_hierarchy
        params = {name: self.params.get(f"{field}__{name}") for name in ("year", "month", "day")}
        try:
            year, month, day = (
                int(v[-1] if isinstance(v, list) else v) if v else None for v in params.values()
            )
        except ValueError:
            return {"show": False}
        keep = [f"{field}__"]

        def link(**lookups: int) -> str:
            return self.get_query_string({f"{field}__{k}": str(v) for k, v in lookups.items()}, keep)

        if year and month and day:
            chosen = dt.date(year, month, day)
            return {
                "show": True,
                "back": {"link": link(year=year, month=month), "title": _format(chosen, "YEAR_MONTH_FORMAT")},
                "choices": [{"title": _format(chosen, "MONTH_DAY_FORMAT")}],
            }
        span = self._span(year, month)
        if span is None:
            return {"show": False}
        first, last = span
        if year and month:
            days = (dt.date(year, month, d) for d in range(first.day, last.day + 1))
            return {
                "show": True,
                "back": {"link": link(year=year), "title": str(year)},
                "choices": [
                    {"link": link(year=year, month=month, day=d.day), "title": _format(d, "MONTH_DAY_FORMAT")}
                    for d in days
                ],
            }
        if year:
            months = (dt.date(year, m, 1) for m in range(first.month, last.month + 1))
            return {
                "show": True,
                "back": {"link": link(), "title": gettext("All dates")},
                "choices": [
                    {"link": link(year=year, month=m.month), "title": _format(m, "YEAR_MONTH_FORMAT")}
                    for m in months
                ],
            }
        return {
            "show": True,
            "back": None,
            "choices": [{"link": link(year=y), "title": str(y)} for y in range(first.year, last.year + 1)],
        }

    def _span(self, year: int | None, month: int | None) -> tuple[dt.datetime, dt.datetime] | None:
        """The first and last local date-times of the table's rows within the period."""
        field = self.date_hierarchy
        queryset = self.root_queryset.order_by()
        if year:
            start = timezone.make_aware(dt.datetime(year, month or 1, 1))
            end = timezone.make_aware(
                dt.datetime(year + (month == 12), month % 12 + 1, 1) if month else dt.datetime(year + 1, 1, 1)
            )
            queryset = queryset.filter(**{f"{field}__gte": start, f"{field}__lt": end})
        first = queryset.aggregate(v=Min(field))["v"]
        last = queryset.aggregate(v=Max(field))["v"]
        if first is None or last is None:
            return None
        return timezone.localtime(first), timezone.localtime(last)


def _format(value: dt.date, format_name: str) -> str:
    return capfirst(formats.date_format(value, format_name))


class LargeTableAdminMixin:
    """List settings for tables that grow to millions of rows."""

    date_hierarchy: str | None = None
    list_per_page = 50
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER

    def get_changelist(self, request: Any, **kwargs: Any) -> type[ChangeList]:
        return FastChangeList

    def get_paginator(self, request: Any, queryset: Any, per_page: int, *args: Any, **kwargs: Any) -> Any:
        try:
            page_number = int(request.GET.get(PAGE_VAR, 1))
        except ValueError:
            page_number = 1
        return LargeTablePaginator(queryset, per_page, *args, page_number=page_number, **kwargs)


def distinct_values(queryset: Any, field: str, limit: int = 200) -> list[str]:
    """The distinct values of an indexed column, at most ``limit`` of them.

    A loose index scan (a recursive query seeking to the next larger value) costs one
    index lookup per distinct value, where ``SELECT DISTINCT`` reads the whole index:
    the difference between milliseconds and a second on a million rows.
    """
    model = queryset.model
    connection = connections[queryset.db]
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    column = quote(model._meta.get_field(field).column)
    sql = (
        f"WITH RECURSIVE t(v) AS ("
        f" SELECT MIN({column}) FROM {table}"
        f" UNION ALL"
        f" SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > t.v) FROM t WHERE t.v IS NOT NULL"
        f") SELECT v FROM t WHERE v IS NOT NULL LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [limit])
        return [row[0] for row in cursor.fetchall()]


class IndexedValuesFilter(admin.SimpleListFilter):
    """A list filter offering the values found in an indexed column (see distinct_values)."""

    field = ""
    empty_label = "(none)"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        values = distinct_values(model_admin.get_queryset(request), self.field)
        return [(value, value or self.empty_label) for value in values]

    def queryset(self, request: Any, queryset: Any) -> Any:
        if self.value() is not None:
            return queryset.filter(**{self.field: self.value()})
        return queryset


def make_values_filter(field: str, title: str, empty_label: str = "(none)") -> type[IndexedValuesFilter]:
    return type(
        f"{field.title().replace('_', '')}Filter",
        (IndexedValuesFilter,),
        {"field": field, "title": title, "parameter_name": field, "empty_label": empty_label},
    )


def compact_time(value: dt.datetime | None) -> str:
    """A local date over its time: a list column has little room."""
    if value is None:
        return "-"
    local = timezone.localtime(value)
    return format_html(
        '<span class="djq-nowrap" title="{}">{}<br>{}</span>',
        local.isoformat(),
        local.strftime("%Y-%m-%d"),
        local.strftime("%H:%M:%S"),
    )


def dotted(name: str) -> str:
    """A dotted name that may wrap after each dot (``shop.tasks.send_receipt``)."""
    *parents, last = name.split(".")
    return format_html_join("", "{}.<wbr>", ((part,) for part in parents)) + format_html("{}", last)


def short_id(message_id: str) -> str:
    """The start of a message id, the whole one on hover: uuids wrap badly in a column."""
    return format_html('<code title="{}">{}…</code>', message_id, message_id[:8])

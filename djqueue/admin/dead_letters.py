"""The dead letters screen: read-only rows, with Retry and Discard as explicit,
permission-checked, CSRF-protected and logged operations."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html

from .. import deadletters
from ..brokers import get_broker
from ..models import DeadLetter
from .base import MessageRowsAdmin, exception_summary, json_display, time_column
from .helpers import dotted, make_values_filter, pre

# Rows one action may touch: a bigger selection is refused with a hint to narrow it,
# so that a "select all" over a million rows cannot hold a transaction for minutes.
ACTION_LIMIT = 1000
# Columns the list needs; the JSON, traceback and raw payload stay in the database.
LIST_COLUMNS = (
    "pk",
    "message_id",
    "actor_name",
    "queue_name",
    "exception_type",
    "failed_at",
    "retries",
    "status",
)


def _plural(count: int, word: str = "dead letter") -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@admin.register(DeadLetter)
class DeadLetterAdmin(MessageRowsAdmin):
    list_display = ("message_short", "actor", "queue", "exception", "failed", "retries", "status")
    list_display_links = ("message_short",)
    list_filter = (
        "status",
        make_values_filter("actor_name", "actor", empty_label="(malformed)"),
        make_values_filter("queue_name", "queue"),
        "failed_at",
    )
    search_fields = ("actor_name", "exception_type", "exception_message")
    search_help_text = "A message id (fast), or text in the actor name or exception (reads every row)."
    date_hierarchy = "failed_at"
    changelist_title = "Dead letters"
    list_columns = LIST_COLUMNS
    preview_field = "exception_message"
    actions = ("retry_dead_letters", "discard_dead_letters")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "message_id",
                    "actor",
                    "queue_name",
                    "status_display",
                    "retries",
                    "enqueued_at",
                    "failed_at",
                )
            },
        ),
        ("Arguments", {"fields": ("args_display", "kwargs_display", "options_display")}),
        ("Error", {"fields": ("exception_type", "exception_message_display", "traceback_display")}),
    )
    malformed_fieldsets = (
        (None, {"fields": ("message_id", "queue_name", "status_display", "failed_at")}),
        ("Error", {"fields": ("exception_type", "exception_message_display")}),
        ("Raw payload", {"fields": ("raw_payload_display",)}),
    )

    # -- permissions: the row is read-only (nobody adds or deletes one: purging is
    # `manage.py purgedeadletters`' job); actions are the only way to change it --------

    def has_retry_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.retry_deadletter")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.malformed_fieldsets if obj is not None and obj.is_malformed else self.fieldsets

    # -- the list -------------------------------------------------------------------

    failed = time_column("failed_at", "failed at")

    @admin.display(description="actor", ordering="actor_name")
    def actor(self, obj: DeadLetter) -> str:
        if not obj.actor_name:
            return format_html('<span class="djq-warning">{}</span>', "⚠ malformed")
        if get_broker().get_actor(obj.actor_name) is None:
            return format_html(
                '{} <span class="djq-warning" title="{}">{}</span>',
                dotted(obj.actor_name),
                "No actor with this name is registered: this dead letter cannot be retried.",
                "⚠ unknown actor",
            )
        return dotted(obj.actor_name)

    @admin.display(description="exception")
    def exception(self, obj: DeadLetter) -> str:
        preview = getattr(obj, "exception_preview", None)
        text = obj.exception_message if preview is None else preview
        return exception_summary(obj.exception_type, text.splitlines()[0] if text else "")

    # -- the change page --------------------------------------------------------------

    @admin.display(description="status")
    def status_display(self, obj: DeadLetter) -> str:
        if obj.status != DeadLetter.Status.RETRIED:
            return obj.status
        when = (
            formats.date_format(timezone.localtime(obj.retried_at), "DATETIME_FORMAT")
            if obj.retried_at
            else "?"
        )
        text = format_html("retried on {} as message <code>{}</code>", when, obj.retried_message_id)
        again = DeadLetter.objects.filter(message_id=obj.retried_message_id).only("pk").first()
        if again is None:
            return text
        url = reverse("admin:djqueue_deadletter_change", args=[again.pk])
        return format_html('{}, which failed again: <a href="{}">its dead letter</a>', text, url)

    args_display = json_display("args")
    kwargs_display = json_display("kwargs")
    options_display = json_display("options")

    @admin.display(description="exception message")
    def exception_message_display(self, obj: DeadLetter) -> str:
        return pre(obj.exception_message)

    @admin.display(description="traceback")
    def traceback_display(self, obj: DeadLetter) -> str:
        return pre(obj.traceback or "(none)")

    @admin.display(description="raw payload")
    def raw_payload_display(self, obj: DeadLetter) -> str:
        return pre(obj.raw_payload or "(empty)")

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        if request.method != "GET":
            # Nothing on this page is editable: changes go through retry/discard only.
            return HttpResponseNotAllowed(["GET"])
        obj = self.get_object(request, object_id)
        context = {
            "title": "Dead letter",
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        if obj is not None:
            problem = deadletters.retry_problem(obj)
            context.update(
                retry_problem=problem,
                can_retry=problem is None and self.has_retry_permission(request, obj),
                can_discard=obj.status == DeadLetter.Status.DEAD and self.has_change_permission(request, obj),
            )
        return super().change_view(request, object_id, form_url, context)

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view  # login, staff check, CSRF
        return [
            path("<path:object_id>/retry/", wrap(self.retry_view), name="djqueue_deadletter_retry"),
            path("<path:object_id>/discard/", wrap(self.discard_view), name="djqueue_deadletter_discard"),
            *super().get_urls(),
        ]

    def _object_or_404(self, request: HttpRequest, object_id: str) -> DeadLetter:
        obj = self.get_object(request, object_id)
        if obj is None:
            raise Http404(f"no dead letter {object_id}")
        return obj

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])  # a GET must never change anything
        obj = self._object_or_404(request, object_id)
        if not self.has_retry_permission(request, obj):
            raise PermissionDenied
        self._retry(request, DeadLetter.objects.filter(pk=obj.pk))
        return HttpResponseRedirect(reverse("admin:djqueue_deadletter_change", args=[obj.pk]))

    def discard_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._object_or_404(request, object_id)
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        self._discard(request, DeadLetter.objects.filter(pk=obj.pk))
        return HttpResponseRedirect(reverse("admin:djqueue_deadletter_change", args=[obj.pk]))

    # -- actions ----------------------------------------------------------------------

    def get_actions(self, request: HttpRequest, action_location: Any = None) -> dict[str, Any]:
        # Django 6.1 passes action_location= (and warns when the signature lacks it).
        if action_location is None:
            actions = super().get_actions(request)
        else:
            actions = super().get_actions(request, action_location=action_location)
        actions.pop("delete_selected", None)
        return actions

    def _selected(self, request: HttpRequest, queryset: Any) -> list[int] | None:
        pks = list(queryset.order_by().values_list("pk", flat=True)[: ACTION_LIMIT + 1])
        if len(pks) > ACTION_LIMIT:
            self.message_user(
                request,
                f"Select at most {ACTION_LIMIT} dead letters per action; narrow the list with the "
                "filters and run it again.",
                messages.ERROR,
            )
            return None
        return pks

    @admin.action(description="Retry selected dead letters", permissions=["retry"])
    def retry_dead_letters(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        pks = self._selected(request, queryset)
        if pks is None:
            return None
        if len(pks) > 1 and request.POST.get("post") != "yes":
            return self._confirm_retry(request, pks)
        self._retry(request, DeadLetter.objects.filter(pk__in=pks))
        return None

    @admin.action(description="Discard selected dead letters", permissions=["change"])
    def discard_dead_letters(self, request: HttpRequest, queryset: Any) -> None:
        pks = self._selected(request, queryset)
        if pks is not None:
            self._discard(request, DeadLetter.objects.filter(pk__in=pks))

    def _confirm_retry(self, request: HttpRequest, pks: list[int]) -> TemplateResponse:
        rows = list(DeadLetter.objects.filter(pk__in=pks).only(*LIST_COLUMNS, "raw_payload"))
        broker = get_broker()
        items = [(row, deadletters.retry_problem(row, broker)) for row in rows]
        context = {
            **self.admin_site.each_context(request),
            "title": "Retry dead letters?",
            "opts": self.opts,
            "items": items,
            "retryable_count": sum(1 for _, problem in items if problem is None),
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/djqueue/deadletter/retry_confirmation.html", context)

    def _retry(self, request: HttpRequest, queryset: Any) -> None:
        summary = deadletters.retry_dead_letters(queryset)
        for row, message_id in summary.retried:
            self.log_change(request, row, f"Retried as message {message_id}.")
        if summary.retried:
            ids = ", ".join(message_id for _, message_id in summary.retried[:3])
            more = "…" if len(summary.retried) > 3 else ""
            self.message_user(
                request,
                f"Retried {_plural(len(summary.retried))} as new message(s) {ids}{more}.",
                messages.SUCCESS,
            )
        if summary.skipped:
            reasons = "; ".join(f"{len(rows)}: {reason}" for reason, rows in summary.skipped.items())
            self.message_user(
                request, f"Skipped {_plural(summary.skipped_count)} ({reasons}).", messages.WARNING
            )

    def _discard(self, request: HttpRequest, queryset: Any) -> None:
        total = queryset.count()
        discarded = deadletters.discard_dead_letters(queryset)
        for row in discarded:
            self.log_change(request, row, "Discarded.")
        self.message_user(request, f"Discarded {_plural(len(discarded))}.", messages.SUCCESS)
        if total > len(discarded):
            self.message_user(
                request,
                f"Skipped {_plural(total - len(discarded))} that were already retried or discarded.",
                messages.WARNING,
            )

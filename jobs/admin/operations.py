"""What runs behind the pages, in the admin: the webhook outbox and the heartbeats."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from .. import webhooks
from ..models import Heartbeat, WebhookDelivery
from .display import RecordAdminMixin, badge


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(RecordAdminMixin, admin.ModelAdmin):
    """The webhook outbox: what was owed to whom, and what became of it."""

    list_display = [
        "id",
        "created_at",
        "event",
        "subject_link",
        "receiver",
        "status_badge",
        "attempts",
        "response_code",
        "next_try_at",
        "sent_at",
    ]
    list_filter = ["status", "event", "created_at"]
    show_facets = admin.ShowFacets.ALWAYS
    # Not by URL: a search would tell a password in it, one character at a time.
    search_fields = ["image__name", "last_error"]
    date_hierarchy = "created_at"
    list_select_related = ["image", "sweep"]
    fields = [
        "event",
        "subject_link",
        "receiver",
        "status_badge",
        "attempts",
        "next_try_at",
        "claimed_by",
        "claimed_at",
        "response_code",
        "last_response",
        "last_error",
        "created_at",
        "sent_at",
        "run",
        "payload",
    ]
    readonly_fields = fields  # type: ignore[assignment]
    actions = ["send_again"]

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_send_again_permission(self, request: HttpRequest) -> bool:
        # The rows stay read-only; sending one again is what changing it means here.
        return request.user.has_perm("jobs.change_webhookdelivery")

    @admin.action(description="Send selected deliveries again", permissions=["send_again"])
    def send_again(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        """Failed (or still pending) rows get a new series of WEBHOOK_TRIES tries, now."""
        selected = list(queryset.values_list("id", flat=True))
        taken = webhooks.send_again(selected)
        if taken:
            self.message_user(
                request,
                f"{len(taken)} delivery(ies) queued to be sent again, with a new series of tries.",
                messages.SUCCESS,
            )
        if len(taken) < len(selected):
            self.message_user(
                request,
                f"{len(selected) - len(taken)} left alone: sent already, or being sent now.",
                messages.WARNING,
            )

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: WebhookDelivery) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="url", ordering="url")
    def receiver(self, obj: WebhookDelivery) -> str:
        return obj.shown_url

    @admin.display(description="about")
    def subject_link(self, obj: WebhookDelivery) -> str:
        """The image an image event tells of, or the sweep of a sweep.finished digest."""
        if obj.event == WebhookDelivery.Event.SWEEP_FINISHED:
            if obj.sweep is None:
                return "— (sweep deleted)"
            url = reverse("admin:jobs_sweep_change", args=[obj.sweep_id])
            return format_html('<a href="{}">sweep #{}</a>', url, obj.sweep_id)
        if obj.image is None:
            return "— (deleted)"
        url = reverse("admin:jobs_image_change", args=[obj.image_id])
        return format_html('<a href="{}">{}</a>', url, obj.image.name)

    @admin.display(description="payload (as sent)")
    def payload(self, obj: WebhookDelivery) -> str:
        try:
            text = json.dumps(json.loads(obj.body), indent=2, ensure_ascii=False)
        except ValueError:
            text = obj.body
        return format_html("<pre>{}</pre>", text)


@admin.register(Heartbeat)
class HeartbeatAdmin(RecordAdminMixin, admin.ModelAdmin):
    """Signs of life read by /healthz. Deleting a folder's row forgets its remembered mount."""

    list_display = ["kind", "name", "seen_at", "detail"]
    list_filter = ["kind"]
    search_fields = ["name"]
    readonly_fields = ["kind", "name", "seen_at", "detail"]

"""Images in the admin: their story, thumbnails and zip; reprocessing, retrying, deleting.

Deleting an image deletes its zip too, once the records are gone for good; a zip that
duplicates outside the deletion still use is kept, with its image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import BooleanField, ExpressionWrapper, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from .. import storage, uploads
from ..archives import archive_holder, sorted_thumbnails, zip_listing
from ..forms import ReprocessForm
from ..links import preview_url, thumbnail_url
from ..models import Image
from ..tasks import queue_images
from .display import (
    GroupedFacetsFilter,
    RecordAdminMixin,
    badge,
    options_text,
    seconds,
    sizes_text,
    task_result_link,
    when_and_took,
    wrap_path,
)
from .sweeps import schedule_names

# An image swept by hand: by a sweep (its record may be gone since), of no schedule, from a
# folder. Read from the image's own row, like its schedule, so that counting the list's
# images by schedule joins no sweep (0.5 s of each page with 200,000 images on SQLite).
SWEPT_BY_HAND = Q(source=Image.Source.FOLDER, schedule_name="", sweep__isnull=False)


class ScheduleFilter(GroupedFacetsFilter):
    """The periodic task that swept an image, or how it came otherwise."""

    title = "schedule"
    parameter_name = "schedule"
    facet_fields = (
        "schedule_name",
        "source",
        ExpressionWrapper(SWEPT_BY_HAND, output_field=BooleanField()),
    )

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        names = schedule_names()
        return [
            *[(f"task:{name}", name) for name in names],
            ("manual", "sweep now / command"),
            ("upload", "upload page"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> QuerySet[Image]:
        value = self.value()
        if not value:
            return queryset
        if value.startswith("task:"):
            return queryset.filter(schedule_name=value[5:])
        if value == "manual":
            return queryset.filter(SWEPT_BY_HAND)
        if value == "upload":
            return queryset.filter(source=Image.Source.UPLOAD)
        return queryset

    def facet_choices(self, row: tuple) -> Iterable[str]:
        schedule_name, source, by_hand = row
        if schedule_name:
            yield f"task:{schedule_name}"
        if by_hand:
            yield "manual"
        if source == Image.Source.UPLOAD:
            yield "upload"


class FormatFilter(GroupedFacetsFilter):
    """The format an image was read as; failed and duplicate images have none recorded."""

    title = "format"
    parameter_name = "format"
    facet_fields = ("format",)

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        formats = (
            Image.objects.exclude(format="")
            .order_by("format")
            .values_list("format", flat=True)
            .distinct()
        )
        return [*[(name, name) for name in formats], ("none", "none recorded")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> QuerySet[Image]:
        if self.value() == "none":
            return queryset.filter(format="")
        return queryset.filter(format=self.value()) if self.value() else queryset

    def facet_choices(self, row: tuple) -> Iterable[str]:
        return [row[0] or "none"]


@admin.register(Image)
class ImageAdmin(RecordAdminMixin, admin.ModelAdmin):
    # Merged columns keep the list within a laptop screen; each figure is on the image's page.
    list_display = [
        "preview",
        "name_display",
        "status_badge",
        "sizes_made",
        "archive_size_display",
        "schedule",
        "finished",
    ]
    list_display_links = ["preview", "name_display"]
    list_filter = ["status", ScheduleFilter, "source", "finished_at", FormatFilter]
    show_facets = admin.ShowFacets.ALWAYS
    search_fields = ["name", "=sha256", "source_path", "error"]
    date_hierarchy = "queued_at"
    list_select_related = ["sweep", "duplicate_of"]
    list_per_page = 50
    actions = ["reprocess", "retry_failed", "delete_selected"]
    change_form_template = "admin/jobs/image/change_form.html"
    delete_selected_confirmation_template = "admin/jobs/image/delete_selected_confirmation.html"
    delete_confirmation_template = "admin/jobs/image/delete_confirmation.html"
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "status_badge",
                    "path_name",
                    "source",
                    "uploaded_by",
                    "folder_display",
                    "sweep_link",
                    "duplicate_link",
                ]
            },
        ),
        ("Failure", {"fields": ["error_block"], "classes": ["parroter-failure"]}),
        (
            "Result",
            {
                "fields": [
                    "pixels",
                    "format",
                    "file_size_display",
                    "sizes_asked",
                    "output_options",
                    "notes",
                    "gallery",
                    "zip_contents",
                    "archive_size_display",
                    "download_button",
                ]
            },
        ),
        (
            "Tracking",
            {
                "fields": [
                    "sha256",
                    "task_result",
                    "attempts",
                    "worker",
                    "token",
                    "lease_until",
                    "queued_at",
                    "started_at",
                    "finished_at",
                    "took",
                ]
            },
        ),
        ("Files", {"fields": ["source_path_display", "original_path_display", "archive_display"]}),
    ]
    # Nothing here is edited by hand: every field shown is read-only.
    readonly_fields = [name for _, section in fieldsets for name in section["fields"]]  # type: ignore[misc]

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        # Its page names the images by id, whatever the list would show: it is for those
        # who may see them.
        return self.has_view_permission(request) and request.user.has_perm("jobs.reprocess_image")

    def get_fieldsets(self, request: HttpRequest, obj: Image | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.error:
            return fieldsets
        return [fieldset for fieldset in fieldsets if fieldset[0] != "Failure"]

    # --- columns and fields

    @admin.display(description="")
    def preview(self, obj: Image) -> str:
        url = preview_url(obj)
        if url is None:
            return format_html('<span class="parroter-nopreview">{}</span>', "no preview")
        return format_html(
            '<img class="parroter-preview" src="{}" alt="" loading="lazy" width="64">', url
        )

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Image) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description="name", ordering="name")
    def name_display(self, obj: Image) -> str:
        facts = [f"{obj.width}×{obj.height}" if obj.width else "", obj.format]
        facts.append(filesizeformat(obj.file_size))
        return format_html(
            '{}<br><small class="parroter-muted">{}</small>',
            wrap_path(obj.name),
            " · ".join(fact for fact in facts if fact),
        )

    @admin.display(description="name")
    def path_name(self, obj: Image) -> str:
        return wrap_path(obj.name)

    @admin.display(description="folder")
    def folder_display(self, obj: Image) -> str:
        return wrap_path(obj.folder)

    @admin.display(description="pixels")
    def pixels(self, obj: Image) -> str:
        return f"{obj.width}×{obj.height}" if obj.width else "—"

    @admin.display(description="sizes")
    def sizes_made(self, obj: Image) -> str:
        holder = archive_holder(obj)
        made = holder.thumbnails if holder else {}
        if not made:
            return format_html('<span class="parroter-muted">{}</span>', sizes_text(obj.sizes))
        return ", ".join(f"{width}×{height}" for _, width, height in sorted_thumbnails(made))

    @admin.display(description="sizes asked")
    def sizes_asked(self, obj: Image) -> str:
        return sizes_text(obj.sizes)

    @admin.display(description="output options")
    def output_options(self, obj: Image) -> str:
        return options_text(obj.options)

    @admin.display(description="archive", ordering="archive_size")
    def archive_size_display(self, obj: Image) -> str:
        holder = archive_holder(obj)
        if holder is None or not holder.archive_size:
            return "—"
        return format_html(
            '<a href="{}" title="download the zip">{}</a>',
            reverse("jobs:archive", args=[obj.id]),
            filesizeformat(holder.archive_size),
        )

    @admin.display(description="file size", ordering="file_size")
    def file_size_display(self, obj: Image) -> str:
        return filesizeformat(obj.file_size)

    @admin.display(description="took")
    def took(self, obj: Image) -> str:
        return seconds(obj.duration)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj: Image) -> str:
        return when_and_took(obj.finished_at, obj.duration)

    @admin.display(description="source path")
    def source_path_display(self, obj: Image) -> str:
        return wrap_path(obj.source_path)

    @admin.display(description="original path")
    def original_path_display(self, obj: Image) -> str:
        return wrap_path(obj.original_path) if obj.original_path else "—"

    @admin.display(description="archive (under MEDIA_ROOT)")
    def archive_display(self, obj: Image) -> str:
        return wrap_path(obj.archive) if obj.archive else "—"

    @admin.display(description="schedule", ordering="schedule_name")
    def schedule(self, obj: Image) -> str:
        if obj.schedule_name:
            return obj.schedule_name
        if obj.source == Image.Source.UPLOAD:
            return "upload"
        return "sweep now" if obj.sweep else "—"

    @admin.display(description="sweep")
    def sweep_link(self, obj: Image) -> str:
        if obj.sweep_id is None:
            return "—"
        url = reverse("admin:jobs_sweep_change", args=[obj.sweep_id])
        return format_html('<a href="{}">{}</a>', url, obj.sweep)

    @admin.display(description="duplicate of")
    def duplicate_link(self, obj: Image) -> str:
        if obj.duplicate_of_id is None:
            return "—"
        url = reverse("admin:jobs_image_change", args=[obj.duplicate_of_id])
        return format_html('<a href="{}">#{} {}</a>', url, obj.duplicate_of_id, obj.duplicate_of)

    @admin.display(description="error")
    def error_block(self, obj: Image) -> str:
        return format_html('<pre class="parroter-error">{}</pre>', obj.error or "—")

    @admin.display(description="thumbnails")
    def gallery(self, obj: Image) -> str:
        holder = archive_holder(obj)
        if holder is None or not holder.thumbnails:
            return "—"
        return format_html(
            '<div class="parroter-gallery">{}</div>',
            format_html_join(
                "",
                '<figure><img src="{}" width="{}" height="{}" alt="{}">'
                "<figcaption>{} → {}×{}</figcaption></figure>",
                (
                    (thumbnail_url(obj, label), width, height, label, label, width, height)
                    for label, width, height in sorted_thumbnails(holder.thumbnails)
                ),
            ),
        )

    @admin.display(description="zip contents")
    def zip_contents(self, obj: Image) -> str:
        listing = zip_listing(obj)
        if listing is None:
            return "—"
        return format_html(
            '<table class="parroter-zip"><tbody>{}</tbody></table>',
            format_html_join(
                "",
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                ((name, filesizeformat(size)) for name, size in listing),
            ),
        )

    @admin.display(description="download")
    def download_button(self, obj: Image) -> str:
        if archive_holder(obj) is None:
            return "—"
        note = "" if obj.status == Image.Status.DONE else " (from an earlier run)"
        return format_html(
            '<a class="button" href="{}">Download zip</a>{}',
            reverse("jobs:archive", args=[obj.id]),
            note,
        )

    @admin.display(description="task result")
    def task_result(self, obj: Image) -> str:
        return task_result_link(obj.task_id)

    # --- actions

    @admin.action(description="Reprocess selected images…", permissions=["reprocess"])
    def reprocess(self, request: HttpRequest, queryset: QuerySet[Image]) -> HttpResponse:
        ids = ",".join(str(pk) for pk in queryset.values_list("id", flat=True))
        return HttpResponseRedirect(reverse("admin:jobs_image_reprocess") + f"?ids={ids}")

    @admin.action(description="Retry selected failed images", permissions=["reprocess"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        failed = list(queryset.filter(status=Image.Status.FAILED))
        if not failed:
            self.message_user(request, "None of the selected images failed.", messages.WARNING)
            return
        self.requeue(request, failed, None)

    def requeue(
        self,
        request: HttpRequest,
        images: list[Image],
        sizes: list[str] | None,
        options: dict[str, Any] | None = None,
    ) -> None:
        result = uploads.claim_again(images, sizes, options)
        if result.queued:
            queued = result.queued
            uploaded = {image.id for image in images if image.source == Image.Source.UPLOAD}
            # Robust: with the broker down they stand as pending; jobs.recover requeues them.
            transaction.on_commit(lambda: queue_images(queued, uploaded=uploaded), robust=True)
            self.message_user(
                request,
                f"{len(queued)} image(s) queued again"
                + (f" with sizes {', '.join(sizes)}" if sizes else "")
                + "; their old archives stay until the new ones are made.",
                messages.SUCCESS,
            )
        for image, reason in result.skipped:
            self.message_user(
                request, f"{image.name} (#{image.id}) left alone: {reason}", messages.WARNING
            )

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "reprocess/",
                self.admin_site.admin_view(self.reprocess_view),
                name="jobs_image_reprocess",
            ),
            *super().get_urls(),
        ]

    def reprocess_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_reprocess_permission(request):
            raise PermissionDenied
        raw = request.POST.get("ids") or request.GET.get("ids") or ""
        ids = [int(part) for part in raw.split(",") if part.strip().isdigit()]
        images = list(Image.objects.filter(id__in=ids).order_by("id"))
        if request.method == "POST":
            form = ReprocessForm(request.POST)
            if form.is_valid() and images:
                self.requeue(
                    request, images, form.cleaned_data["sizes"], form.cleaned_data["options"]
                )
                url = reverse("admin:jobs_image_changelist")
                if len(images) == 1:
                    url = reverse("admin:jobs_image_change", args=[images[0].id])
                return HttpResponseRedirect(url)
        else:
            current = {image.sizes_key for image in images}
            sizes = images[0].sizes if len(current) == 1 else settings.THUMBNAIL_SIZES
            form = ReprocessForm(initial={"sizes": ", ".join(sizes)})
        context = {
            **self.admin_site.each_context(request),
            "title": "Reprocess images",
            "opts": self.opts,
            "form": form,
            "images": [(image, uploads.why_not_reprocess(image)) for image in images],
            "ids": ",".join(str(image.id) for image in images),
        }
        return TemplateResponse(request, "admin/jobs/image/reprocess.html", context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> Any:
        image = self.get_object(request, object_id) if object_id else None
        extra_context = {
            **(extra_context or {}),
            "can_reprocess": self.has_reprocess_permission(request),
            # A failed or waiting image, or one whose zip retention deleted, has none to offer.
            "has_zip": image is not None and archive_holder(image) is not None,
        }
        return super().changeform_view(request, object_id, form_url, extra_context)

    # --- deleting records with their archives

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        self.delete_queryset(request, Image.objects.filter(id=obj.id))

    @admin.action(permissions=["delete"], description="Delete selected images")
    def delete_selected(
        self, request: HttpRequest, queryset: QuerySet[Image]
    ) -> HttpResponse | None:
        """Django's deletion, asked and counted and logged for the images that may go only:
        the others are named in a warning and stay."""
        deletable = self.deletable(request, queryset)
        if not deletable.exists():
            return None
        return django_delete_selected(self, request, deletable)

    def deletable(self, request: HttpRequest, queryset: QuerySet[Image]) -> QuerySet[Image]:
        """`queryset` less the images deleting leaves, each named in a warning: those still
        being processed, and those whose zip duplicates outside `queryset` use."""
        busy = queryset.exclude(status__in=Image.FINAL_STATUSES)
        if busy.exists():
            self.message_user(
                request,
                f"{busy.count()} image(s) still being processed were kept; delete them once "
                "they are finished.",
                messages.WARNING,
            )
        final = queryset.filter(status__in=Image.FINAL_STATUSES).select_related(None)
        used = uploads.duplicates_using(final)
        for image in final.filter(id__in=list(used)).only("id", "name"):
            self.message_user(
                request,
                f"{image.name} (#{image.id}) was kept: "
                f"{uploads.duplicates_reason(used[image.id])}; "
                "select its duplicates too to delete them together",
                messages.WARNING,
            )
        return final.exclude(id__in=list(used))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        with transaction.atomic():
            # Locked before judging which may go (PostgreSQL; SQLite takes its one write
            # lock at the start): a worker recording a duplicate of one of them takes the
            # same lock (Image.mark_duplicate), so it is either seen here, keeping the image,
            # or finds it gone and makes a zip of its own.
            locked = Image.objects.filter(id__in=queryset.values("id")).order_by("id")
            list(locked.select_for_update().values_list("id", flat=True))
            final = self.deletable(request, queryset)
            archives = list(final.values_list("archive", flat=True))
            final.delete()
            # Files go only once the records are gone for good.
            transaction.on_commit(lambda: storage.remove_archives(archives))

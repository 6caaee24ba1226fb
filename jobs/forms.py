"""Forms that turn what a person types into valid sweep arguments, with readable errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, cast

from django import forms
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.template.defaultfilters import filesizeformat
from django_celery_beat.admin import PeriodicTaskForm

from . import pipeline
from .beat import sweep_kwargs
from .sweeper import (
    MAX_QUALITY,
    MIN_QUALITY,
    PRESET_CHOICES,
    FolderRejected,
    resolve_folder,
    resolve_options,
    resolve_sizes,
    scheduled_folders,
)
from .tasks import SWEEP_TASK
from .upload_limits import file_over_limit

SIZES_HELP = "Bounding boxes like 128x128, separated by commas or spaces. Never upscaled."


def default_sizes() -> str:
    return ", ".join(settings.THUMBNAIL_SIZES)


class SizesField(forms.CharField):
    """Size labels, parsed and normalised ("128x128, 64X64" -> ["128x128", "64x64"])."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("help_text", SIZES_HELP)
        kwargs.setdefault("widget", forms.TextInput(attrs={"size": 50, "spellcheck": "false"}))
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> list[str] | None:  # type: ignore[override]
        text = super().to_python(value)
        if not text:
            return None
        try:
            return resolve_sizes(text.replace(";", ",").replace(" ", ","))
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list | tuple) else value


def clean_folder(value: str) -> str:
    """A folder a sweep may work in, or a ValidationError saying why not."""
    if not value or not value.strip():
        raise forms.ValidationError("Give the absolute path of the folder to sweep.")
    try:
        return str(resolve_folder(value.strip()))
    except FolderRejected as exc:
        raise forms.ValidationError(str(exc)) from None


class SweepNowForm(forms.Form):
    folder = forms.CharField(
        max_length=1024,
        widget=forms.TextInput(attrs={"size": 70, "list": "known-folders"}),
        help_text="An absolute folder under WATCH_FOLDER or WATCH_ROOTS.",
    )
    sizes = SizesField()

    def clean_folder(self) -> str:
        return clean_folder(self.cleaned_data["folder"])


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleImageField(forms.FileField):
    """Several image files, each checked by its content: type, bytes and pixel count."""

    widget = MultipleFileInput

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": "image/*"}))
        super().__init__(**kwargs)

    def clean(self, data: Any, initial: Any = None) -> list[UploadedFile]:
        files = [item for item in (data if isinstance(data, list | tuple) else [data]) if item]
        if not files:
            if self.required:
                raise forms.ValidationError("Choose at least one image.")
            return []
        limit = settings.UPLOAD_MAX_FILES
        if len(files) > limit:
            raise forms.ValidationError(f"{len(files)} files chosen; at most {limit} per upload.")
        return files


def check_upload(upload: UploadedFile) -> str:
    """Why an uploaded file cannot be taken (empty when it can): size, type, pixels.

    Judged from the file object: Pillow reads the header it needs, not the whole file.
    """
    limit = settings.UPLOAD_MAX_BYTES
    size = upload.size or 0
    if size > limit:
        return f"{filesizeformat(size)}, {file_over_limit(limit)}"
    limits = pipeline.Limits(max_pixels=settings.MAX_IMAGE_PIXELS, max_bytes=limit)
    try:
        with pipeline.open_image(cast(BinaryIO, upload), limits):
            pass
    except pipeline.ImageRejected as exc:
        return str(exc)
    finally:
        # Pillow closes a file it refused after reading its header; such a file is not kept.
        if not upload.closed:
            upload.seek(0)
    return ""


PRESET_LABELS = {
    "format": (
        "Thumbnail format",
        "same: the input's family (JPEG, WebP, else PNG; HEIC/AVIF become JPEG).",
    ),
    "fit": ("Fit", "contain: inside the box, aspect kept; cover: exactly the box, cut."),
    "gravity": ("Cut around", "With cover: the centre, or the busiest part (attention)."),
    "metadata": ("Metadata", "strip: no EXIF/XMP; keep: author, copyright, camera, date."),
    "colour": ("Colour", "srgb: wide-gamut photos converted to sRGB; keep: their profile."),
}


class PresetForm(forms.Form):
    """The output preset's fields: each empty by default, which means the settings' choice."""

    format = forms.ChoiceField(required=False)
    fit = forms.ChoiceField(required=False)
    gravity = forms.ChoiceField(required=False)
    metadata = forms.ChoiceField(required=False)
    gps = forms.BooleanField(
        label="Keep GPS", required=False, help_text="With metadata keep: the location too."
    )
    colour = forms.ChoiceField(required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, (choices, default) in PRESET_CHOICES.items():
            if name not in self.fields:
                continue
            chosen = getattr(settings, f"THUMBNAIL_{name.upper()}", default)
            field = cast(forms.ChoiceField, self.fields[name])
            field.choices = [("", f"default ({chosen})"), *((c, c) for c in choices)]
            field.label, field.help_text = PRESET_LABELS[name]

    def preset(self, data: dict[str, Any]) -> dict[str, Any]:
        """The preset's keyword arguments as chosen (unset ones left out), checked."""
        chosen = {name: data[name] for name in PRESET_CHOICES if data.get(name)}
        if data.get("gps"):
            chosen["gps"] = True
        try:
            resolve_options(chosen)
        except ValueError as exc:
            self.add_error("gps" if "gps" in str(exc) else None, str(exc))
        return chosen


class UploadForm(PresetForm):
    images = MultipleImageField(label="Images")
    sizes = SizesField(initial=default_sizes)
    field_order = ["images", "sizes"]

    def __init__(
        self, *args: Any, refused: list[dict[str, str]] | None = None, **kwargs: Any
    ) -> None:
        """`refused`: files the upload handler already dropped, with the reason."""
        super().__init__(*args, **kwargs)
        self.refused = list(refused or [])
        if self.refused:
            self.fields["images"].required = False

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        if "sizes" in data and not data["sizes"]:
            data["sizes"] = resolve_sizes(None)
        accepted, rejected = [], list(self.refused)
        for upload in data.get("images") or []:
            reason = check_upload(upload)
            if reason:
                rejected.append({"name": upload.name, "error": reason})
            else:
                accepted.append(upload)
        data["accepted"] = accepted
        data["rejected"] = rejected
        data["options"] = self.preset(data)
        if "images" in data and not accepted:
            self.add_error("images", "None of the chosen files can be taken (see each reason).")
        return data


class ReprocessForm(PresetForm):
    """New sizes, and optionally a new output preset, for images made again."""

    sizes = SizesField(initial=default_sizes)
    change_preset = forms.BooleanField(
        label="Apply this output preset",
        required=False,
        help_text="Unticked, each image keeps the output options it was made with.",
    )
    field_order = ["sizes", "change_preset"]

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        data["options"] = self.preset(data) if data.get("change_preset") else None
        return data


class SweepTaskForm(PeriodicTaskForm, PresetForm):
    """A periodic task; for `jobs.sweep_folder` the kwargs come from the sweep fields."""

    folder = forms.CharField(
        required=False,
        max_length=1024,
        widget=forms.TextInput(attrs={"size": 70, "spellcheck": "false"}),
        help_text="Absolute path of the folder to sweep; under WATCH_FOLDER or WATCH_ROOTS, "
        "outside MEDIA_ROOT, readable and writable (originals are moved out of it).",
    )
    sizes = SizesField(required=False)
    quality = forms.IntegerField(
        label="Thumbnail quality",
        required=False,
        min_value=MIN_QUALITY,
        max_value=MAX_QUALITY,
        widget=forms.NumberInput(attrs={"style": "width: 5em"}),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "kwargs" not in self.fields:
            return  # a read-only view (a settings-owned row)
        self.fields["quality"].help_text = (
            f"JPEG, WebP and AVIF thumbnails, {MIN_QUALITY} to {MAX_QUALITY}; lower is "
            f"smaller. Empty: JPEG_QUALITY (now {settings.JPEG_QUALITY}) for JPEG, "
            f"{pipeline.EncodeOptions().webp_quality} for WebP, "
            f"{pipeline.EncodeOptions().avif_quality} for AVIF."
        )
        self.fields["kwargs"].required = False
        self.fields["kwargs"].help_text = (
            "JSON keyword arguments. For jobs.sweep_folder they are written from the folder, "
            "sizes and quality fields above."
        )
        if self.instance.pk is None:
            self.initial.setdefault("regtask", SWEEP_TASK)
            self.initial.setdefault("sizes", default_sizes())
        elif self.instance.task == SWEEP_TASK:
            kwargs = sweep_kwargs(self.instance)
            self.initial.setdefault("folder", kwargs.get("folder") or "")
            sizes = kwargs.get("sizes")
            if isinstance(sizes, list):
                self.initial.setdefault("sizes", ", ".join(map(str, sizes)))
            elif isinstance(sizes, str):
                self.initial.setdefault("sizes", sizes)
            if kwargs.get("quality") is not None:
                self.initial.setdefault("quality", kwargs["quality"])
            for name in (*PRESET_CHOICES, "gps"):
                if kwargs.get(name):
                    self.initial.setdefault(name, kwargs[name])

    def is_sweep(self) -> bool:
        return SWEEP_TASK in (self.data.get("regtask"), self.data.get("task"))

    def clean_kwargs(self) -> str:
        value = self.cleaned_data.get("kwargs") or ""
        if self.is_sweep() or not value.strip():
            return value.strip() or "{}"  # written from the sweep fields in clean()
        return super().clean_kwargs()

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        if data.get("task") != SWEEP_TASK:
            return data
        folder = data.get("folder") or ""
        try:
            folder = clean_folder(folder)
        except forms.ValidationError as exc:
            self.add_error("folder", exc)
            return data
        others = scheduled_folders(exclude=[self.instance.pk] if self.instance.pk else [])
        other = others.get(Path(folder))
        if other is not None:
            self.add_error(
                "folder",
                f"{folder} is already swept by the periodic task “{other}”; "
                "change that one instead (two schedules would race for the same files).",
            )
            return data
        sizes = data.get("sizes") or list(settings.THUMBNAIL_SIZES)
        data["folder"] = folder
        data["sizes"] = sizes
        kwargs: dict[str, Any] = {"folder": folder, "sizes": sizes}
        if data.get("quality") is not None:
            kwargs["quality"] = data["quality"]
        kwargs.update(self.preset(data))
        data["kwargs"] = json.dumps(kwargs)
        self.instance.kwargs = data["kwargs"]
        return data

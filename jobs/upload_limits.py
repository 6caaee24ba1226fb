"""Request bodies bounded before they are read.

Django parses a multipart body into memory and temporary files the first time anything
reads `request.POST`, and the CSRF middleware does so before any view runs. So the limits
are enforced ahead of that, in two places:

- `BodyLimitMiddleware` judges a request by its headers alone. An upload from someone not
  signed in (401), without a declared length (411), declaring more than the upload limits
  allow (413) or sent while MEDIA_ROOT is below MIN_FREE_MB (507) is answered before a
  byte of its body is read; so is any other request whose
  declared body is over Django's own limit for form data (no other view takes files).
- `LimitedUploadHandler`, put first among an upload's handlers by the middleware, watches
  the body while it is parsed: a file that grows past UPLOAD_MAX_BYTES is dropped at the
  limit and reported, one file too many stops the parse. No more than the limit of any
  file is ever written to a temporary file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadhandler import FileUploadHandler, SkipFile, StopUpload
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, QueryDict
from django.template.defaultfilters import filesizeformat
from django.utils.datastructures import MultiValueDict

from .sweeper import space_shortage

# Room for the multipart framing of every part (boundaries, part headers) and the small
# fields beside the files; generous, since what matters is the bound, not its exactness.
MULTIPART_OVERHEAD = 1024 * 1024


def upload_body_limit() -> int:
    """The most bytes an upload request may declare: every file at its limit, and framing."""
    return settings.UPLOAD_MAX_FILES * settings.UPLOAD_MAX_BYTES + MULTIPART_OVERHEAD


def form_body_limit() -> int | None:
    """The most bytes any other request may declare (None: no limit)."""
    if settings.DATA_UPLOAD_MAX_MEMORY_SIZE is None:
        return None
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE + MULTIPART_OVERHEAD


def file_over_limit(limit: int) -> str:
    return f"over the limit of {filesizeformat(limit)} per file"


def accepts_uploads(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """Mark a view as one that takes files, under the upload limits (the outermost decorator)."""
    view.accepts_uploads = True  # type: ignore[attr-defined]
    return view


def declared_length(request: HttpRequest) -> int | None:
    """The body length the request declares, or None when it declares none (or nonsense)."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


def upload_refused(message: str, status: int, code: str) -> JsonResponse:
    """An upload refused as a whole, in the shape of the upload form's errors."""
    return JsonResponse({"errors": {"images": [{"message": message, "code": code}]}}, status=status)


def too_large(length: int, limit: int) -> str:
    return f"The upload is too large ({length:,} bytes; at most {limit:,} bytes in one upload)."


@dataclass(frozen=True)
class Refusal:
    """Why a whole upload was refused while it was read, and the HTTP status that says so."""

    message: str
    status: int
    code: str


class LimitedUploadHandler(FileUploadHandler):
    """The first upload handler of an upload: no file past its limit, no file too many.

    It passes each chunk on to Django's own handlers (memory, then a temporary file), so
    raising before passing on the chunk that crosses a limit keeps what they write within it.
    Files dropped for their size are listed in `rejected`; `refusal` says why the whole
    upload was stopped, if it was.
    """

    def __init__(
        self, request: HttpRequest, *, max_files: int, max_bytes: int, max_body: int
    ) -> None:
        super().__init__(request)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_body = max_body
        self.refusal: Refusal | None = None
        self.rejected: list[dict[str, str]] = []
        self.files = 0
        self.file_bytes = 0

    def handle_raw_input(
        self,
        input_data: Any,
        META: dict[str, Any],
        content_length: int,
        boundary: Any,
        encoding: str | None = None,
    ) -> tuple[QueryDict, MultiValueDict] | None:
        # The middleware refuses these from the headers; this keeps the bound for a request
        # that reached the parser without it. Nothing is read: the parse is empty.
        if content_length > self.max_body:
            self.refusal = Refusal(too_large(content_length, self.max_body), 413, "too_large")
            return QueryDict(encoding=encoding), MultiValueDict()
        return None

    def new_file(self, field_name: str, file_name: str, *args: Any, **kwargs: Any) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        self.files += 1
        self.file_bytes = 0
        if self.files > self.max_files:
            self.refusal = Refusal(
                f"More than {self.max_files} files chosen; at most {self.max_files} per upload.",
                400,
                "too_many_files",
            )
            # The rest of the body is left unread.
            raise StopUpload(connection_reset=True)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.file_bytes += len(raw_data)
        if self.file_bytes > self.max_bytes:
            self.rejected.append(
                {"name": self.file_name or "", "error": file_over_limit(self.max_bytes)}
            )
            # Django closes (and so deletes) what the next handlers wrote, and reads the rest
            # of this file without keeping it.
            raise SkipFile
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler makes the file


def upload_handler_of(request: HttpRequest) -> LimitedUploadHandler:
    """The limiting upload handler the middleware put on this upload request."""
    for handler in request.upload_handlers:
        if isinstance(handler, LimitedUploadHandler):
            return handler
    raise ImproperlyConfigured(
        "jobs.upload_limits.BodyLimitMiddleware must be in MIDDLEWARE, before CsrfViewMiddleware"
    )


class BodyLimitMiddleware:
    """Refuse what may not be read, from the headers, before any middleware reads the body.

    Its `process_view` must come before CsrfViewMiddleware's (list it before that one in
    MIDDLEWARE): that is where the body is first read. `request.user` is there by then, since
    every middleware's request phase runs before any `process_view`.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., HttpResponseBase],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        length = declared_length(request)
        if getattr(view_func, "accepts_uploads", False):
            return self.check_upload(request, length)
        limit = form_body_limit()
        if length is not None and limit is not None and length > limit:
            return HttpResponse(
                f"Request body too large ({length:,} bytes; at most {limit:,}).\n",
                status=413,
                content_type="text/plain",
            )
        return None

    def check_upload(self, request: HttpRequest, length: int | None) -> HttpResponseBase | None:
        if request.method != "POST":
            return None  # the view says what it allows
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        if length is None:
            # Django reads a body without a Content-Length (chunked) as empty: say so.
            return upload_refused(
                "The upload must declare its length (Content-Length).", 411, "length_required"
            )
        limit = upload_body_limit()
        if length > limit:
            return upload_refused(too_large(length, limit), 413, "too_large")
        if space_shortage():
            # An upload is a sweep: below MIN_FREE_MB it claims nothing, and its body would
            # only fill the disk further. The shortage's own text names server paths.
            return upload_refused(
                "The server is short of disk space (below MIN_FREE_MB): uploads are refused "
                "until space is freed.",
                507,
                "insufficient_storage",
            )
        request.upload_handlers.insert(
            0,
            LimitedUploadHandler(
                request,
                max_files=settings.UPLOAD_MAX_FILES,
                max_bytes=settings.UPLOAD_MAX_BYTES,
                max_body=limit,
            ),
        )
        return None

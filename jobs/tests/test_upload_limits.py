"""Upload bodies bounded before they are read: the middleware, the upload handler, and both
against the real web server (`make run`'s gunicorn command) with raw HTTP.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import secrets
import socket
import string
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadhandler import FileUploadHandler, TemporaryFileUploadHandler
from django.http.multipartparser import MultiPartParser
from django.urls import reverse

from jobs.models import Image, Sweep
from jobs.upload_limits import MULTIPART_OVERHEAD, LimitedUploadHandler

from .browser import start_web
from .conftest import image_bytes
from .processes import wait_for

BOUNDARY = "parroter-test-boundary"
PASSWORD = secrets.token_urlsafe()


# --- Multipart bodies, written by hand --------------------------------------------------


def field_part(name: str, value: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


def file_head(name: str, field: str = "images") -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


def multipart(*files: tuple[str, bytes], sizes: str = "64x64") -> bytes:
    body = field_part("sizes", sizes)
    for name, data in files:
        body += file_head(name) + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


# --- The upload handler, on Django's own parser ----------------------------------------


class CountingHandler(FileUploadHandler):
    """Sits between the limiting handler and the one that writes: what reaches the disk."""

    def __init__(self) -> None:
        super().__init__()
        self.passed: dict[str, int] = {}

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.passed[self.file_name] = self.passed.get(self.file_name, 0) + len(raw_data)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


def parse(body: bytes, limiter: LimitedUploadHandler, *after: FileUploadHandler):
    stream = io.BytesIO(body)
    meta = {"CONTENT_TYPE": MULTIPART, "CONTENT_LENGTH": str(len(body))}
    post, files = MultiPartParser(meta, stream, [limiter, *after]).parse()
    return post, files, stream


@pytest.fixture
def temp_dir(tmp_path, settings) -> Path:
    """Django's upload spool, where nothing over a limit may land; every file goes there."""
    folder = tmp_path / "spool"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 0
    return folder


def test_limited_upload_handler_drops_a_file_at_its_limit_and_keeps_the_rest(temp_dir):
    limit = 100_000
    limiter = LimitedUploadHandler(None, max_files=5, max_bytes=limit, max_body=10**9)
    counter = CountingHandler()
    small = image_bytes((50, 50))
    body = multipart(("big.jpg", b"x" * (3 * limit)), ("small.jpg", small), sizes="32x32")

    post, files, _ = parse(body, limiter, counter, TemporaryFileUploadHandler())

    assert [upload.name for upload in files.getlist("images")] == ["small.jpg"]
    assert files["images"].read() == small
    assert post["sizes"] == "32x32"  # the parse went on after the dropped file
    assert limiter.refusal is None
    assert limiter.rejected == [
        {"name": "big.jpg", "error": "over the limit of 97.7\xa0KB per file"}
    ]
    assert 0 < counter.passed["big.jpg"] <= limit  # what was written of it, at most the limit
    files["images"].close()
    assert list(temp_dir.iterdir()) == []  # the dropped file's spool was deleted too


def test_limited_upload_handler_stops_at_one_file_too_many_leaving_the_rest_unread(temp_dir):
    limiter = LimitedUploadHandler(None, max_files=2, max_bytes=10**6, max_body=10**9)
    counter = CountingHandler()
    body = multipart(*((f"{n}.jpg", b"y" * 50_000) for n in range(5)))

    _, files, stream = parse(body, limiter, counter, TemporaryFileUploadHandler())

    assert limiter.refusal is not None
    assert limiter.refusal.status == 400
    assert limiter.refusal.message == "More than 2 files chosen; at most 2 per upload."
    assert set(counter.passed) == {"0.jpg", "1.jpg"}  # not a byte of the third
    assert stream.tell() < len(body)  # the rest of the body was never read
    for upload in files.getlist("images"):
        upload.close()
    assert list(temp_dir.iterdir()) == []


def test_limited_upload_handler_reads_nothing_of_a_body_over_its_limit(temp_dir):
    body = multipart(("a.jpg", b"z" * 10_000))
    limiter = LimitedUploadHandler(None, max_files=5, max_bytes=10**6, max_body=len(body) - 1)

    post, files, stream = parse(body, limiter, TemporaryFileUploadHandler())

    assert not post
    assert not files
    assert stream.tell() == 0
    assert limiter.refusal is not None
    assert limiter.refusal.status == 413


# --- The middleware, through the test client ------------------------------------------


@pytest.mark.django_db
def test_body_limit_middleware_refuses_an_upload_declaring_more_than_the_limits(
    client, folders, settings
):
    settings.UPLOAD_MAX_FILES = 2
    settings.UPLOAD_MAX_BYTES = 1000
    client.force_login(User.objects.create_user("alice"))
    declared = 2 * 1000 + MULTIPART_OVERHEAD + 1
    response = client.post(
        reverse("jobs:upload"), b"", content_type=MULTIPART, CONTENT_LENGTH=str(declared)
    )
    assert response.status_code == 413
    assert response.json()["errors"]["images"][0] == {
        "message": f"The upload is too large ({declared:,} bytes; "
        f"at most {declared - 1:,} bytes in one upload).",
        "code": "too_large",
    }
    assert not Image.objects.exists()


@pytest.mark.django_db
def test_body_limit_middleware_asks_an_upload_without_a_length_for_one(client, folders):
    client.force_login(User.objects.create_user("alice"))
    response = client.post(
        reverse("jobs:upload"), multipart(("a.jpg", image_bytes())), content_type=MULTIPART,
        CONTENT_LENGTH="", HTTP_TRANSFER_ENCODING="chunked",
    )  # fmt: skip
    assert response.status_code == 411
    assert response.json()["errors"]["images"][0]["code"] == "length_required"


@pytest.mark.django_db
def test_body_limit_middleware_refuses_a_large_body_for_any_other_view(client, settings):
    declared = settings.DATA_UPLOAD_MAX_MEMORY_SIZE + MULTIPART_OVERHEAD + 1
    response = client.post(
        reverse("jobs:login"), b"", content_type=MULTIPART, CONTENT_LENGTH=str(declared)
    )
    assert response.status_code == 413
    assert response["Content-Type"] == "text/plain"


@pytest.mark.django_db
def test_body_limit_middleware_refuses_an_upload_while_media_root_is_short_of_space(
    client, folders, settings, temp_dir
):
    settings.MIN_FREE_MB = 10**9  # more than any disk here
    client.force_login(User.objects.create_user("alice"))
    response = client.post(
        reverse("jobs:upload"), multipart(("a.jpg", image_bytes())), content_type=MULTIPART
    )
    assert response.status_code == 507
    error = response.json()["errors"]["images"][0]
    assert error["code"] == "insufficient_storage"
    assert "MIN_FREE_MB" in error["message"]
    assert str(folders["media"]) not in error["message"]
    assert not Sweep.objects.exists()
    assert not Image.objects.exists()
    assert list(temp_dir.iterdir()) == []
    assert not (folders["media"] / "uploads").exists()


@pytest.mark.django_db
def test_upload_reports_a_file_over_the_limit_and_takes_the_others(
    client, folders, settings, temp_dir
):
    settings.UPLOAD_MAX_BYTES = 5000
    client.force_login(User.objects.create_user("alice"))
    big, small = image_bytes((900, 900)), image_bytes((40, 40))
    assert len(big) > 5000 >= len(small)
    response = client.post(
        reverse("jobs:upload"),
        multipart(("big.jpg", big), ("small.jpg", small)),
        content_type=MULTIPART,
    )
    assert response.status_code == 201
    body = response.json()
    assert [image["name"] for image in body["sweep"]["images"]] == ["small.jpg"]
    assert body["rejected"] == [
        {"name": "big.jpg", "error": "over the limit of 4.9\xa0KB per file"}
    ]
    # Judged from its spooled file (every file is spooled here), which is gone with the request.
    assert Path(Image.objects.get().source_path).read_bytes() == small
    assert list(temp_dir.iterdir()) == []


# --- Against the real web server -------------------------------------------------------


def connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def send_head(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def read_response(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    data = response.read()
    response.close()
    return response.status, json.loads(data)


def cookies_of(response: http.client.HTTPResponse) -> dict[str, str]:
    jar = SimpleCookie()
    for header in response.headers.get_all("Set-Cookie") or []:
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def sign_in(base_url: str, username: str) -> dict[str, str]:
    """Log in through the login page, as a browser does; returns the session's cookies."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/login/")
        response = connection.getresponse()
        page = response.read().decode()
        cookies = cookies_of(response)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = {"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token}
        connection.request(
            "POST",
            "/login/",
            urlencode(form),
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": f"csrftoken={cookies['csrftoken']}",
            },
        )
        response = connection.getresponse()
        response.read()
        assert response.status == 302, response.status
        return {**cookies, **cookies_of(response)}
    finally:
        connection.close()


def upload_headers(cookies: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        "Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()),
        "X-CSRFToken": cookies["csrftoken"],
        "Content-Type": MULTIPART,
        **extra,
    }


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.fixture
def web(system, folders, tmp_path) -> tuple[str, Path]:
    """gunicorn as `make run` starts it, spooling uploads into a folder of the test's own."""
    spool = tmp_path / "spool"
    spool.mkdir()
    system.environment["FILE_UPLOAD_TEMP_DIR"] = str(spool)
    system.environment["UPLOAD_MAX_BYTES"] = str(1024 * 1024)
    return start_web(system), spool


@pytest.mark.integration
def test_upload_over_the_limit_is_refused_before_a_byte_of_it_is_stored(web, folders):
    base_url, spool = web
    User.objects.create_user("alice", password=PASSWORD)
    declared = 50 * 1024 * 1024
    first_part = file_head("huge.jpg") + b"\xff" * 16_384

    # Anonymous, with a made-up CSRF cookie that matches its header (so CSRF would pass):
    # answered at once, although 50 MB were announced and only 16 KiB sent.
    made_up = "".join(secrets.choice(string.ascii_letters) for _ in range(32))
    with connect(base_url) as sock:
        send_head(
            sock,
            "/uploads/",
            upload_headers({"csrftoken": made_up}, **{"Content-Length": str(declared)}),
        )
        sock.sendall(first_part)
        assert read_response(sock) == (401, {"error": "authentication required"})

    # Signed in, announcing more than UPLOAD_MAX_FILES x UPLOAD_MAX_BYTES: 413, unread.
    cookies = sign_in(base_url, "alice")
    assert declared > 20 * 1024 * 1024 + MULTIPART_OVERHEAD
    with connect(base_url) as sock:
        send_head(sock, "/uploads/", upload_headers(cookies, **{"Content-Length": str(declared)}))
        sock.sendall(first_part)
        status, body = read_response(sock)
    assert status == 413
    assert body["errors"]["images"][0]["code"] == "too_large"

    # Signed in, chunked (no length): refused at once rather than read as an empty body.
    with connect(base_url) as sock:
        send_head(sock, "/uploads/", upload_headers(cookies, **{"Transfer-Encoding": "chunked"}))
        sock.sendall(b"%x\r\n%s\r\n" % (len(first_part), first_part))
        status, body = read_response(sock)
    assert status == 411
    assert body["errors"]["images"][0]["code"] == "length_required"

    assert files_under(spool) == []
    assert files_under(folders["media"]) == []
    assert not Image.objects.exists()


@pytest.mark.integration
def test_upload_file_over_its_limit_is_dropped_at_the_limit_while_it_streams(web, folders):
    base_url, spool = web
    User.objects.create_user("alice", password=PASSWORD)
    cookies = sign_in(base_url, "alice")
    limit = 1024 * 1024  # UPLOAD_MAX_BYTES of the server
    piece = 256 * 1024
    big = secrets.token_bytes(4 * limit)
    head = field_part("sizes", "64x64") + file_head("big.jpg")
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(head) + len(big) + len(tail)

    with connect(base_url) as sock:
        send_head(sock, "/uploads/", upload_headers(cookies, **{"Content-Length": str(length)}))
        sock.sendall(head + big[:piece])
        # Spooled into the test's folder (so its staying empty elsewhere means something)...
        wait_for(lambda: files_under(spool), timeout=30, what="the upload's spool file")
        seen = 0
        sent = piece
        while files_under(spool) and sent < 2 * limit:
            sock.sendall(big[sent : sent + piece])
            sent += piece
            seen = max([seen, *(path.stat().st_size for path in files_under(spool))])
        # ...and gone once the file passed its limit, with the rest still to come.
        wait_for(lambda: not files_under(spool), timeout=30, what="the spool file dropped")
        assert seen <= limit
        sock.sendall(big[sent:] + tail)
        status, body = read_response(sock)

    assert status == 400
    assert body["rejected"] == [
        {"name": "big.jpg", "error": "over the limit of 1.0\xa0MB per file"}
    ]
    assert files_under(folders["media"]) == []

    # A normal upload through the same server is taken.
    photo = image_bytes((300, 200))
    data = multipart(("photo.jpg", photo))
    with connect(base_url) as sock:
        send_head(sock, "/uploads/", upload_headers(cookies, **{"Content-Length": str(len(data))}))
        sock.sendall(data)
        status, body = read_response(sock)
    assert status == 201, body
    assert [image["name"] for image in body["sweep"]["images"]] == ["photo.jpg"]
    assert Path(Image.objects.get().source_path).read_bytes() == photo
    assert files_under(spool) == []


@pytest.mark.integration
def test_upload_whose_body_lies_about_its_length_stores_nothing(web, folders):
    base_url, spool = web
    User.objects.create_user("alice", password=PASSWORD)
    cookies = sign_in(base_url, "alice")
    photo = image_bytes((300, 200))
    data = multipart(("photo.jpg", photo))

    # Shorter than it said: the client stops halfway through the file and closes its side.
    with connect(base_url) as sock:
        send_head(
            sock, "/uploads/", upload_headers(cookies, **{"Content-Length": str(len(data) + 10**6)})
        )
        sock.sendall(data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)
        status, body = read_response(sock)
    assert status == 400, body

    # Longer than it said: nothing past the declared length is read as part of the upload,
    # so the file is cut before its closing boundary and dropped.
    with connect(base_url) as sock:
        send_head(
            sock, "/uploads/", upload_headers(cookies, **{"Content-Length": str(len(data) // 2)})
        )
        sock.sendall(data)
        status, body = read_response(sock)
    assert status == 400, body

    assert files_under(spool) == []
    assert files_under(folders["media"]) == []
    assert not Image.objects.exists()

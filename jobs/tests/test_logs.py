"""Log lines that file names cannot forge: the escaping, and a real worker's log."""

from __future__ import annotations

import io
import logging
import signal

import pytest

from jobs.logs import escape_controls
from jobs.models import Image

from .conftest import image_bytes
from .processes import wait_for

FORGED = "ERROR forged line"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("x.jpg\nINFO forged", "x.jpg\\nINFO forged"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00 del\x7f c1\x85\x9b", "nul\\x00 del\\x7f c1\\x85\\x9b"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("café – ✓ 写真.jpg", "café – ✓ 写真.jpg"),
    ],
)
def test_escape_controls_writes_control_characters_as_escapes(text, escaped):
    assert escape_controls(text) == escaped


@pytest.fixture
def log_lines():
    """What a plain logging handler writes, on a logger of the test's own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("jobs.tests.logs")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def test_log_records_escape_their_arguments_not_their_format(log_lines):
    logger, stream = log_lines
    name = f"x.jpg\n{FORGED}\x1b[2J"
    logger.warning("image %s (%s) failed:\n\t%s", 7, name, OSError(2, f"cannot read {name}"))
    logger.warning(
        "%(name)s is %(size)d bytes, %(ratio).1f%%", {"name": name, "size": 3, "ratio": 2}
    )
    logger.warning("repr %r", name)
    logger.warning("a mapping as the one argument: %s", {"name": name})
    assert stream.getvalue().splitlines() == [
        "WARNING image 7 (x.jpg\\nERROR forged line\\x1b[2J) failed:",  # the format's own
        "\t[Errno 2] cannot read x.jpg\\nERROR forged line\\x1b[2J",  # newline is kept
        "WARNING x.jpg\\nERROR forged line\\x1b[2J is 3 bytes, 2.0%",
        "WARNING repr 'x.jpg\\\\nERROR forged line\\\\x1b[2J'",
        "WARNING a mapping as the one argument: {'name': 'x.jpg\\nERROR forged line\\x1b[2J'}",
    ]


def test_log_records_leave_tracebacks_alone(log_lines):
    logger, stream = log_lines
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("while reading %s", "a\nb")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ERROR while reading a\\nb"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_worker_log_escapes_a_file_name_made_to_forge_lines(system, folders, drop):
    system.worker()
    system.beat()
    bad = f"notes\n{FORGED}\x1b[31m.jpg"
    good = f"photo\r\n{FORGED}\x1b]0;title\x07.jpg"
    drop(folders["watch"], bad, b"not an image at all")
    drop(folders["watch"], good, image_bytes((300, 200)))

    wait_for(
        lambda: Image.objects.filter(status__in=Image.FINAL_STATUSES).count() == 2,
        timeout=90,
        what="both files to finish",
    )
    assert Image.objects.get(name=bad).status == Image.Status.FAILED
    assert Image.objects.get(name=good).status == Image.Status.DONE

    # A failure is logged once it is recorded: stopped (warm), the worker has written all.
    system.kill("worker", signal.SIGTERM)
    log = (system.log_dir / "worker.log").read_text()
    # The failure was logged with the name (so the check below means something), escaped.
    assert "(notes\\nERROR forged line\\x1b[31m.jpg) failed: not an image" in log
    assert not [line for line in log.splitlines() if line.startswith(FORGED)]
    assert "\x1b" not in log
    assert "\r" not in log

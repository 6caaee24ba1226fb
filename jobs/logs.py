"""Log lines that text from outside cannot forge.

File names, request paths and error messages reach log lines as %-style arguments, and a
file may be named `x.jpg\\nERROR forged line` or carry terminal escape sequences. Every log
record is made through one record factory that escapes control characters in its
arguments; the format string (written in the code) and tracebacks are left alone.

A record factory rather than a handler filter: Celery workers replace the root logger's
handlers with their own, but every record in the process is still made by the factory.
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Iterator, Mapping
from typing import Any

# C0 controls, DEL, C1 controls, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    character = match.group()
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`, ...)."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


class Escaped:
    """An argument that formats as its own text with control characters escaped."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_controls(str(self.value))

    def __repr__(self) -> str:
        return escape_controls(repr(self.value))


def escaped_argument(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if value is None or isinstance(value, numbers.Number):
        return value  # for %d, %f, %x: never text
    return Escaped(value)  # str() of a path or an exception may hold anything


class EscapedMapping(Mapping):
    """Arguments by name (`%(name)s`), escaped as they are looked up.

    A view rather than a copy: a mapping with its own look-up rules (gunicorn's access-log
    atoms answer "-" for a missing key) keeps them.
    """

    __slots__ = ("mapping",)

    def __init__(self, mapping: Mapping[Any, Any]) -> None:
        self.mapping = mapping

    def __getitem__(self, key: Any) -> Any:
        return escaped_argument(self.mapping[key])

    def __iter__(self) -> Iterator[Any]:
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)

    # `logger.info("%s", some_dict)`: the mapping is then the one argument itself.
    def __str__(self) -> str:
        return escape_controls(str(self.mapping))

    def __repr__(self) -> str:
        return escape_controls(repr(self.mapping))


def escaped_arguments(args: Any) -> Any:
    if isinstance(args, Mapping):
        return EscapedMapping(args)
    if isinstance(args, tuple):
        return tuple(escaped_argument(value) for value in args)
    return args


def escape_log_arguments() -> None:
    """Make every log record of this process escape its arguments (once; idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "escapes_controls", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.args:
            record.args = escaped_arguments(record.args)
        return record

    factory.escapes_controls = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)

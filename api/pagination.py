"""Opaque keyset cursors: the sort key of the last item of a page, base64url JSON.

A cursor is tagged with the list it belongs to, and each part of its key is checked
against the column it is compared with (``INT4``, ``INT8``, ``TEXT``, ``TIME``), so a
cursor of another list, a forged one or one out of a column's range is a 422 problem
naming ``cursor`` rather than a silently wrong page or a database error.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from api.guard import text_problem
from api.problems import Problem

#: A cursor key part's check: the value to compare with, or ValueError/TypeError.
Part = Callable[[Any], Any]


def _integer(low: int, high: int) -> Part:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"not an integer in [{low}, {high}]")
        return value

    return check


def TEXT(value: Any) -> str:
    """A cursor part compared with a text column: a string PostgreSQL can hold."""
    if not isinstance(value, str) or len(value) > 1000 or text_problem(value):
        raise ValueError("not a text key")
    return value


def TIME(value: Any) -> datetime:
    """A cursor part compared with a timestamptz column: an ISO 8601 time with its zone."""
    if not isinstance(value, str):
        raise TypeError("not a time")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("a time without a zone")
    return moment


#: A cursor part compared with an int4 column (non-negative).
INT4 = _integer(0, 2**31 - 1)
#: A cursor part compared with an int8 column (non-negative).
INT8 = _integer(0, 2**63 - 1)


def encode_cursor(kind: str, *key: Any) -> str:
    """The cursor after the item whose sort key is ``key`` in list ``kind``."""
    raw = orjson.dumps([kind, *key])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None, *parts: Part) -> list[Any] | None:
    """The sort key in ``cursor`` (None for no cursor), each part checked by ``parts``;
    a 422 problem naming ``cursor`` if it is not one of list ``kind``'s cursors."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
        if not isinstance(value, list) or len(value) != len(parts) + 1 or value[0] != kind:
            raise ValueError("another list's cursor")
        return [check(v) for check, v in zip(parts, value[1:], strict=True)]
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise Problem(
            422, "invalid_cursor", "cursor is not a cursor of this list", field="cursor"
        ) from None

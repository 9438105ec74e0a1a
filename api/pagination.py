"""Opaque keyset cursors: the sort key of the last item of a page, base64url JSON.

A cursor is tagged with the list it belongs to, and each part of its key is checked
against the column it is compared with (``INT4``, ``INT8``, ``TEXT``, ``TIME``), so a
cursor of another list, a forged one or one out of a column's range is a 422 problem
naming ``cursor`` rather than a silently wrong page or a database error. ``Keyset``
is the one helper every list route pages with.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import orjson

from api.guard import text_problem
from api.problems import Problem
from api.schemas.common import Page

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


Row = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Keyset:
    """A list read by keyset: its cursor tag (``kind``), the check of each part of its
    sort key (``parts``), and the sort key of a row (``key``: times as ISO 8601).

    A route reads ``after(cursor)``, asks its query for ``limit + 1`` rows after it (the
    one more says whether a next page exists), and answers ``page(rows, limit, item)``.
    """

    kind: str
    parts: tuple[Part, ...]
    key: Callable[[Row], tuple[Any, ...]]

    def after(self, cursor: str | None) -> Any:
        """The sort key ``cursor`` names, as the query takes it: None without a cursor,
        the value itself for a one-part key, else a tuple; a 422 problem naming
        ``cursor`` if it is not a cursor of this list."""
        key = decode_cursor(self.kind, cursor, *self.parts)
        if key is None:
            return None
        return key[0] if len(self.parts) == 1 else tuple(key)

    def page(self, rows: Sequence[Row], limit: int, item: Callable[[Row], T]) -> Page[T]:
        """The first ``limit`` of ``rows`` (fetched ``limit + 1``) as items, with the cursor
        after the last of them when there are more."""
        more = len(rows) > limit
        next_cursor = (
            encode_cursor(
                self.kind,
                *(
                    k.isoformat() if isinstance(k, datetime) else k
                    for k in self.key(rows[limit - 1])
                ),
            )
            if more
            else None
        )
        return Page(items=[item(r) for r in rows[:limit]], next_cursor=next_cursor)

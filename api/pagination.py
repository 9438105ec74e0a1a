"""Opaque keyset cursors: the sort key of the last item of a page, base64url JSON.

A cursor is tagged with the list it belongs to, so one list's cursor given to another
is a 422 problem naming ``cursor`` rather than a silently wrong page.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from api.problems import Problem


def encode_cursor(kind: str, *key: Any) -> str:
    """The cursor after the item whose sort key is ``key`` in list ``kind``."""
    raw = orjson.dumps([kind, *key])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None, arity: int) -> list[Any] | None:
    """The sort key in ``cursor`` (None for no cursor); 422 problem if it is not one of
    list ``kind``'s cursors with ``arity`` key parts."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (ValueError, orjson.JSONDecodeError):
        value = None
    if not isinstance(value, list) or len(value) != arity + 1 or value[0] != kind:
        raise Problem(422, "invalid_cursor", "cursor is not a cursor of this list", field="cursor")
    return value[1:]

"""What every resource's bodies share: ids, the request base, bounded JSON, pages.

Ids in bodies and paths are 1 to 128 characters of ``[A-Za-z0-9_.:@-]`` starting with a
letter or digit, so they are safe in a URL path.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Most bytes a task's payload or result may take as JSON: events carry them, and a Kafka
#: record is at most 1 MiB by default (message.max.bytes), with headers and escaping.
MAX_JSON_BYTES = 256 * 1024


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:  # api/guard.py refuses these first; this is the backstop
        raise ValueError(f"cannot be stored as JSON: {exc}") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_JSON_BYTES} are allowed")
    return value


BoundedJson = Annotated[dict[str, Any], AfterValidator(_bounded_json)]

#: The largest version (an int4 column in the read models).
INT4_MAX = 2**31 - 1

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]


class In(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``?cursor=`` for the next (None: last)."""

    items: list[T]
    next_cursor: str | None = None

"""Audit: an aggregate's full history, from the event archive."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import Cursor, FreshDep, Limit, ReadModelsDep
from api.pagination import INT4, Keyset
from api.problems import Problem
from api.schemas.common import Page
from api.schemas.events import CloudEventPublic
from domain.registry import DECIDERS
from projections import queries

router = APIRouter(prefix="/aggregates", tags=["audit"])

#: By version.
HISTORY = Keyset("events", (INT4,), lambda row: (row["version"],))


@router.get(
    "/{aggregate_type}/{aggregate_id}/events",
    response_model=Page[CloudEventPublic],
    responses={404: {"description": "unknown aggregate type (problem+json)"}},
)
async def aggregate_history(
    aggregate_type: Annotated[str, Path(max_length=64, description="agent, task ...")],
    aggregate_id: Annotated[str, Path(min_length=1, max_length=128)],
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page[CloudEventPublic]:
    """The aggregate's events as CloudEvents, by version (an empty page if it has none)."""
    if aggregate_type not in DECIDERS:
        raise Problem(
            404,
            "unknown_aggregate_type",
            f"no aggregate type {aggregate_type!r}; known: {', '.join(sorted(DECIDERS))}",
            field="aggregate_type",
        )
    rows = await read_models(
        queries.aggregate_history,
        aggregate_type,
        aggregate_id,
        after_version=HISTORY.after(cursor) or 0,
        limit=limit + 1,
    )
    return HISTORY.page(rows, limit, CloudEventPublic.from_row)

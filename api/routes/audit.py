"""Audit: an aggregate's full history, from the event archive."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.deps import Cursor, FreshDep, Limit, PoolDep, SettingsDep
from api.pagination import INT4, decode_cursor, encode_cursor
from api.problems import Problem
from api.schemas import CloudEventPublic, Page
from domain.registry import DECIDERS
from projections import queries

router = APIRouter(prefix="/aggregates", tags=["audit"])


@router.get(
    "/{aggregate_type}/{aggregate_id}/events",
    response_model=Page[CloudEventPublic],
    responses={404: {"description": "unknown aggregate type (problem+json)"}},
)
async def aggregate_history(
    aggregate_type: Annotated[str, Path(max_length=64, description="agent, task ...")],
    aggregate_id: Annotated[str, Path(min_length=1, max_length=128)],
    settings: SettingsDep,
    pool: PoolDep,
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
    key = decode_cursor("events", cursor, INT4)
    rows = await queries.aggregate_history(
        pool,
        settings.db_schema,
        aggregate_type,
        aggregate_id,
        after_version=key[0] if key else 0,
        limit=limit + 1,
    )
    items = [CloudEventPublic.from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=items,
        next_cursor=encode_cursor("events", rows[limit - 1]["version"]) if more else None,
    )

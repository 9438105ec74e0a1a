"""Dead letters: the records some role could not process, with the reason (read only).

Replaying one is an operator's act after a fix: ``swarmlog deadletters replay``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Cursor, Limit, ReadModelsDep
from api.pagination import TEXT, TIME, Keyset
from api.schemas.common import Page
from api.schemas.deadletters import DeadLetterPublic
from projections import queries

router = APIRouter(prefix="/deadletters", tags=["dead letters"])

#: Newest first: by ``dead_lettered_at``, then id, both descending.
DEAD_LETTERS = Keyset("deadletters", (TIME, TEXT), lambda row: (row["dead_lettered_at"], row["id"]))


@router.get("", response_model=Page[DeadLetterPublic])
async def list_dead_letters(
    read_models: ReadModelsDep,
    topic: Annotated[
        str | None, Query(min_length=1, max_length=249, description="records from this topic")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[DeadLetterPublic]:
    """Dead letters newest first (by ``dead_lettered_at``, then id, both descending),
    optionally of records from one ``topic`` (e.g. ``swarm.task.events``)."""
    rows = await read_models(
        queries.list_dead_letters, topic=topic, after=DEAD_LETTERS.after(cursor), limit=limit + 1
    )
    return DEAD_LETTERS.page(rows, limit, DeadLetterPublic.from_row)

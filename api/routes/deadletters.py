"""Dead letters: the records some role could not process, with the reason (read only).

Replaying one is an operator's act after a fix: ``swarmlog deadletters replay``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import Cursor, Limit, PoolDep, SettingsDep
from api.pagination import TEXT, TIME, decode_cursor, encode_cursor
from api.schemas import Page
from projections import queries

router = APIRouter(prefix="/deadletters", tags=["dead letters"])


class DeadLetterPublic(BaseModel):
    """A dead letter: where the record was, why it could not be processed, and whether it
    was replayed. The record itself (key, value, headers) is in the dead letter on the
    dead-letter topic, at ``letter_partition``/``letter_offset``."""

    id: str = Field(description="the dead letter's CloudEvent id (one per record position)")
    topic: str | None = Field(description="the topic the record is on")
    partition: int | None = Field(description="its partition")
    offset: int | None = Field(description="its offset")
    reason: str = Field(description="why it could not be processed")
    key: str | None = Field(description="the record's key (for an event: the aggregate id)")
    dead_lettered_at: datetime
    letter_partition: int = Field(description="the dead letter's partition on the topic")
    letter_offset: int = Field(description="the dead letter's offset on the topic")
    replayed_at: datetime | None = Field(description="when it was replayed (None: not yet)")
    replay_note: str | None = Field(description="what the replay did")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeadLetterPublic:
        """From a ``queries.list_dead_letters`` row."""
        return cls(
            topic=row["source_topic"],
            partition=row["source_partition"],
            offset=row["source_offset"],
            **{
                k: row[k]
                for k in (
                    "id",
                    "reason",
                    "key",
                    "dead_lettered_at",
                    "letter_partition",
                    "letter_offset",
                    "replayed_at",
                    "replay_note",
                )
            },
        )


@router.get("", response_model=Page[DeadLetterPublic])
async def list_dead_letters(
    settings: SettingsDep,
    pool: PoolDep,
    topic: Annotated[
        str | None, Query(min_length=1, max_length=249, description="records from this topic")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[DeadLetterPublic]:
    """Dead letters newest first (by ``dead_lettered_at``, then id, both descending),
    optionally of records from one ``topic`` (e.g. ``swarm.task.events``)."""
    key = decode_cursor("deadletters", cursor, TIME, TEXT)
    after = (key[0], key[1]) if key is not None else None
    rows = await queries.list_dead_letters(
        pool, settings.db_schema, topic=topic, after=after, limit=limit + 1
    )
    items = [DeadLetterPublic.from_row(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor("deadletters", last["dead_lettered_at"].isoformat(), last["id"])
    return Page(items=items, next_cursor=next_cursor)

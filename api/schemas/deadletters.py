"""Dead letters: where a record was, why it could not be processed, its replay."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


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

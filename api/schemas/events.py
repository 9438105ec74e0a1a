"""An aggregate's history as CloudEvents (the audit route)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class CloudEventPublic(BaseModel):
    """A CloudEvent in JSON structured form, with where it is in the log (``position``).

    ``data`` is the event exactly as on Kafka (money in integer micro-tokens): the event
    is the public contract.
    """

    model_config = ConfigDict(extra="allow")

    specversion: str = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    datacontenttype: str = "application/json"
    sequence: str
    aggregatetype: str
    correlationid: str
    causationid: str
    schemaversion: int
    data: dict[str, Any]
    position: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CloudEventPublic:
        """From a row of ``projections.queries.aggregate_history``."""
        return cls(
            id=row["event_id"],
            source=f"/swarmlog/{row['aggregate_type']}",
            type=row["type"],
            subject=row["aggregate_id"],
            time=row["time"],
            sequence=str(row["version"]),
            aggregatetype=row["aggregate_type"],
            correlationid=row["correlation_id"],
            causationid=row["causation_id"],
            schemaversion=row["schema_version"],
            data=row["data"],
            position={
                "topic": row["topic"],
                "partition": row["partition"],
                "offset": row["offset"],
            },
        )

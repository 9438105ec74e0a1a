"""A recorded event: a domain event as the log holds it, with its envelope.

The deciders make bare events; once written, an event also has an id, the aggregate it
belongs to and the version it brought that aggregate to, the time of the command that
caused it, its correlation and causation ids, and where it is on the log. Process
managers (streams/) and views (projections/) read this type; how it is written to and
read from Kafka (CloudEvents) is infra's business (infra/cloudevents.py, infra/mapper.py),
so nothing here knows a header or a topic's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from domain.messages import Event


@dataclass(frozen=True)
class Position:
    """Where a record is on the log: topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        """``{"topic", "partition", "offset"}``."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class RecordedEvent:
    """A domain event with its envelope, as written to or read back from an event topic.

    ``id`` is the event's id (derived from its command: ``domain.ids.event_id``);
    ``aggregate_type``/``aggregate_id`` name the aggregate (the CloudEvent subject);
    ``version`` is the aggregate version this event brought the aggregate to (1-based,
    the CloudEvent ``sequence``); ``time`` is when the command that caused it was issued;
    ``correlation_id`` and ``causation_id`` tie it to the request and the command that
    caused it; ``position`` is where it was read from (None before it is written).
    """

    id: str
    aggregate_type: str
    aggregate_id: str
    version: int
    time: datetime
    correlation_id: str
    causation_id: str
    event: Event
    position: Position | None = None

"""Command outcomes: what the processor decided for each command, as a CloudEvent on the
command-outcome topic (keyed by aggregate id, co-partitioned with the commands).

``decode_outcome`` is total: it raises DecodeError and nothing else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from domain.ids import derived_id
from domain.messages import Rejection
from domain.recorded import Position
from infra.cloudevents import (
    TYPE_PREFIX,
    DecodeError,
    Record,
    model_json,
    read_binary,
    require_time,
    to_record,
)


class WrittenEvent(BaseModel):
    """One event a command wrote, as its outcome lists it: the event's ``id``, its
    CloudEvent ``type``, the aggregate ``version`` it brought, and where it is (``topic``,
    then ``partition`` and ``offset`` once the write is acknowledged).

    An outcome too large for one record lists its events by id, version, partition and
    offset only (``bare``). On the wire a field that is None is left out, so the listing
    has only the keys it knows.
    """

    id: str
    type: str | None = None
    version: int | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    @model_serializer(mode="wrap")
    def _known(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {k: v for k, v in dumped.items() if v is not None}

    @property
    def position(self) -> Position | None:
        """Where the event is, when the listing has its topic, partition and offset."""
        if self.topic is None or self.partition is None or self.offset is None:
            return None
        return Position(self.topic, self.partition, self.offset)

    def at(self, partition: int, offset: int) -> WrittenEvent:
        """This event with the partition and offset its write was acknowledged at."""
        return self.model_copy(update={"partition": partition, "offset": offset})

    def bare(self) -> WrittenEvent:
        """This event listed by id, version, partition and offset only."""
        return WrittenEvent(
            id=self.id, version=self.version, partition=self.partition, offset=self.offset
        )


class Outcome(BaseModel):
    """What the decider made of one command, published on the command-outcome topic.

    ``status`` is accepted or rejected; ``version`` is the aggregate version after the
    command (unchanged when rejected); ``events`` lists each written event's id, type,
    version and position; ``state`` is the aggregate's state after the command.
    ``duplicate`` is true when this repeats the outcome of an earlier command with the
    same id (nothing new was written).
    """

    command_id: str
    command_type: str
    aggregate_type: str
    aggregate_id: str
    status: str
    version: int = Field(ge=0, le=2**63 - 1)
    events: list[WrittenEvent] = []
    rejection: Rejection | None = None
    state: dict[str, Any] | None = None
    duplicate: bool = False
    decided_at: datetime


def encode_outcome(topic: str, outcome: Outcome) -> Record:
    """The Kafka record of an outcome, keyed by aggregate id (co-partitioned)."""
    return to_record(
        topic,
        {
            "id": derived_id("outcome", outcome.command_id, outcome.duplicate, outcome.decided_at),
            "source": "/swarmlog/processor",
            "type": f"{TYPE_PREFIX}.command.{outcome.status}",
            "subject": outcome.command_id,
            "time": outcome.decided_at,
            "datacontenttype": "application/json",
            "partitionkey": outcome.aggregate_id,
            "aggregatetype": outcome.aggregate_type,
        },
        model_json(outcome),
    )


def decode_outcome(record: Any) -> Outcome:
    """A consumer record of the outcome topic as an Outcome; DecodeError if bad."""
    attributes, data = read_binary(record)
    require_time(attributes)
    try:
        outcome = Outcome.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"outcome: {exc}") from exc
    if outcome.decided_at.utcoffset() is None:
        raise DecodeError("outcome: decided_at has no time zone")
    return outcome

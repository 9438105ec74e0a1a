"""The event mapping: domain events to and from CloudEvents on Kafka.

After eventsourcing's mapper/transcoder split: the CloudEvents binding
(infra/cloudevents.py) knows headers and bytes; this module knows swarmlog's events: the
CloudEvent type of each event class (``io.swarmlog.<aggregate>.<event_type>``), its
schema version and the upcasters that bring an older record's data to it, and the
attributes every event record carries (listed once, in ``event_attributes``: the binary
record and the JSON structured form both come from it).

The ``EventMapper`` is built from the event classes it may read, each with the upcasters
declared on it (``Event.upcasters``); ``decode_event`` reads with the one it is given,
by default ``EVENTS``, built from every decider in domain/registry.py.

Reading is total: whatever a record holds, ``decode_event`` raises ``DecodeError`` and
nothing else (an unknown type, a ``sequence`` or ``schemaversion`` that is not an
integer in range, no ``subject``, data that does not validate, a time with no time zone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from domain.messages import Decider, Event
from domain.recorded import Position, RecordedEvent
from domain.registry import DECIDERS
from infra.cloudevents import (
    TYPE_PREFIX,
    DecodeError,
    Record,
    integer,
    model_json,
    naive_time,
    quote,
    read_binary,
    require_time,
    structured,
    to_record,
)


def event_ce_type(aggregate_type: str, event_type: str) -> str:
    """``io.swarmlog.task.assigned`` for ("task", "assigned")."""
    return f"{TYPE_PREFIX}.{aggregate_type}.{event_type}"


def ce_type_of(recorded: RecordedEvent) -> str:
    """The CloudEvent type of a recorded event: ``io.swarmlog.<aggregate>.<event_type>``."""
    return event_ce_type(recorded.aggregate_type, recorded.event.event_type)


class EventMapper:
    """The event classes a reader knows, by CloudEvent type, with their upcasters.

    ``event_types`` maps an aggregate type to its event classes. Each class's
    ``schema_version`` is the version it reads; the ``upcasters`` declared on it bring
    older data up to it one version at a time. ValueError when a class does not declare
    exactly ``schema_version - 1`` upcasters (a version could not be read).
    """

    def __init__(self, event_types: Mapping[str, Iterable[type[Event]]]) -> None:
        self._classes: dict[tuple[str, str], type[Event]] = {}
        for aggregate_type, classes in event_types.items():
            for cls in classes:
                if len(cls.upcasters) != cls.schema_version - 1:
                    raise ValueError(
                        f"{cls.__name__} is at schema version {cls.schema_version} and"
                        f" declares {len(cls.upcasters)} upcasters, not"
                        f" {cls.schema_version - 1}"
                    )
                self._classes.setdefault((aggregate_type, cls.event_type), cls)

    @classmethod
    def of(cls, deciders: Iterable[Decider[Any, Any, Any]]) -> EventMapper:
        """The mapper of the event classes of ``deciders``."""
        return cls({d.aggregate_type: d.event_types for d in deciders})

    def resolve(self, ce_type: str) -> tuple[str, type[Event]]:
        """(aggregate type, event class) of a CloudEvent type; DecodeError if unknown."""
        parts = ce_type.split(".")
        cls = None
        if len(parts) == 4 and ".".join(parts[:2]) == TYPE_PREFIX:
            cls = self._classes.get((parts[2], parts[3]))
        if cls is None:
            raise DecodeError(f"unknown event type {quote(ce_type)}")
        return parts[2], cls

    def upcast(self, cls: type[Event], version: int, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` of a version-``version`` record of ``cls`` brought to the class's
        schema version by its upcasters; DecodeError when there is no upcaster for a step."""
        while version < cls.schema_version:
            if not 1 <= version <= len(cls.upcasters):
                raise DecodeError(f"no upcaster for {cls.__name__} schema version {version}")
            data = cls.upcasters[version - 1](data)
            version += 1
        return data


EVENTS = EventMapper.of(DECIDERS.values())
"""Every aggregate's events, with the upcasters declared on their classes."""


def event_attributes(recorded: RecordedEvent) -> dict[str, Any]:
    """The CloudEvent attributes of a recorded event, in header order (the record key is
    ``partitionkey``, the aggregate id; ``sequence`` is the aggregate version)."""
    return {
        "id": recorded.id,
        "source": f"/swarmlog/{recorded.aggregate_type}",
        "type": ce_type_of(recorded),
        "subject": recorded.aggregate_id,
        "time": recorded.time,
        "datacontenttype": "application/json",
        "partitionkey": recorded.aggregate_id,
        "sequence": str(recorded.version),
        "aggregatetype": recorded.aggregate_type,
        "correlationid": recorded.correlation_id,
        "causationid": recorded.causation_id,
        "schemaversion": recorded.event.schema_version,
    }


def encode_event(topic: str, recorded: RecordedEvent) -> Record:
    """The Kafka record of ``recorded`` for ``topic``."""
    return to_record(topic, event_attributes(recorded), model_json(recorded.event))


def event_json(recorded: RecordedEvent) -> dict[str, Any]:
    """The CloudEvent in JSON structured form (what SSE and the audit API show), with
    ``position`` (topic, partition, offset) after ``data`` when it was read from the log."""
    body = structured(event_attributes(recorded), recorded.event.model_dump(mode="json"))
    if recorded.position is not None:
        body["position"] = recorded.position.as_dict()
    return body


def decode_event(record: Any, events: EventMapper = EVENTS) -> RecordedEvent:
    """A consumer record of an event topic as a RecordedEvent, read with the event
    classes and upcasters of ``events``; DecodeError if it is not one.

    Total: whatever the record holds (any headers, key and value, from any producer),
    nothing but DecodeError is raised. Beyond a valid CloudEvent (see ``read_binary``) an
    event needs a known type, a ``subject`` (the aggregate id), a ``sequence`` in
    [1, 2^63-1], a ``schemaversion`` in [1, the event's current version] (upcast from an
    older one) and data that validates with no time lacking a time zone.
    """
    attributes, data = read_binary(record)
    try:
        return _read_event(events, record, attributes, data)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{quote(attributes.get('type'))}: {type(exc).__name__}: {exc}") from exc


def _read_event(
    events: EventMapper, record: Any, attributes: dict[str, Any], data: dict[str, Any]
) -> RecordedEvent:
    ce_type = str(attributes.get("type", ""))
    aggregate_type, cls = events.resolve(ce_type)
    time = require_time(attributes)
    version = integer(attributes.get("schemaversion", "1"), "schemaversion", 1)
    if version > cls.schema_version:
        raise DecodeError(f"{ce_type}: schema version {version} is newer than {cls.schema_version}")
    sequence = integer(attributes.get("sequence"), "sequence", 1)
    subject = attributes.get("subject")
    if not isinstance(subject, str) or not subject:
        raise DecodeError(f"{ce_type}: no subject (the aggregate id)")
    data = events.upcast(cls, version, data)
    try:
        event = cls.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    if naive_time(event):
        raise DecodeError(f"{ce_type}: a time in the data has no time zone")
    return RecordedEvent(
        id=str(attributes["id"]),
        aggregate_type=aggregate_type,
        aggregate_id=subject,
        version=sequence,
        time=time,
        correlation_id=str(attributes.get("correlationid", "")),
        causation_id=str(attributes.get("causationid", "")),
        event=event,
        position=Position(record.topic, record.partition, record.offset),
    )

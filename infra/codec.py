"""CloudEvents 1.0 on the Kafka protocol binding, binary content mode, JSON data.

Every record swarmlog writes (commands, events, command outcomes, dead letters) is a
CloudEvent: attributes in ``ce_*`` headers, ``content-type: application/json``, the data
as the record value, the record key = the ``partitionkey`` extension = the aggregate id.
Any CloudEvents SDK or ``kcat`` can read the topics without our code.

Spec: CloudEvents 1.0.2 and its Kafka Protocol Binding; extensions used: ``sequence``
(the aggregate version, as a decimal string), ``partitionkey``, and our own
``aggregatetype``, ``correlationid``, ``causationid``, ``schemaversion`` and, on
commands, ``expectedversion`` (all lower-case alphanumeric, as the spec requires).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import BaseModel

from domain.messages import Command, Event, Rejection
from domain.registry import DECIDERS

TYPE_PREFIX = "io.swarmlog"
NAMESPACE = uuid.UUID("6f1c1f2e-4b7a-5d8e-9a41-53c0a1e2b7d9")
_NAMESPACE_BYTES = NAMESPACE.bytes
_FORMAT = JSONFormat()

Headers = list[tuple[str, bytes]]


class DecodeError(ValueError):
    """A record that is not a CloudEvent swarmlog understands; goes to the dead-letter topic."""


@dataclass(frozen=True)
class Position:
    """Where a record is: topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        """``{"topic", "partition", "offset"}``."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class Record:
    """A Kafka record ready to send: topic, key, value and headers."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers


@dataclass(frozen=True)
class StoredEvent:
    """A domain event with its envelope, as read back from an event topic.

    ``version`` is the aggregate version this event brought the aggregate to (1-based);
    ``time`` is when the command that caused it was issued; ``position`` is where it
    was read from (None before it is written).
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

    @property
    def type(self) -> str:
        """The CloudEvent type: ``io.swarmlog.<aggregate>.<event_type>``."""
        return event_ce_type(self.aggregate_type, self.event.event_type)

    def to_json(self) -> dict[str, Any]:
        """The CloudEvent in JSON structured form (what SSE and the audit API show)."""
        body: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": f"/swarmlog/{self.aggregate_type}",
            "type": self.type,
            "subject": self.aggregate_id,
            "time": _iso(self.time),
            "datacontenttype": "application/json",
            "sequence": str(self.version),
            "aggregatetype": self.aggregate_type,
            "correlationid": self.correlation_id,
            "causationid": self.causation_id,
            "schemaversion": self.event.schema_version,
            "data": self.event.model_dump(mode="json"),
        }
        if self.position is not None:
            body["position"] = self.position.as_dict()
        return body


def _iso(t: datetime) -> str:
    s = t.astimezone(timezone.utc).isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def event_ce_type(aggregate_type: str, event_type: str) -> str:
    """``io.swarmlog.task.assigned`` for ("task", "assigned")."""
    return f"{TYPE_PREFIX}.{aggregate_type}.{event_type}"


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))``, without building a UUID object (a third of
    the time; the hot path derives one or two per command)."""
    b = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def event_id(command_id: str, index: int) -> str:
    """Deterministic id of the ``index``-th event caused by ``command_id`` (uuid5)."""
    return _uuid5(f"{command_id}/{index}")


def derived_id(*parts: object) -> str:
    """A deterministic command id from the event and purpose that caused it (uuid5)."""
    return _uuid5("/".join(str(p) for p in parts))


#: (CloudEvent type, schema version) -> function upgrading the data one version.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _upcast(ce_type: str, version: int, data: dict[str, Any], target: int) -> dict[str, Any]:
    while version < target:
        step = UPCASTERS.get((ce_type, version))
        if step is None:
            raise DecodeError(f"no upcaster for {ce_type} schema version {version}")
        data = step(data)
        version += 1
    return data


# The attributes the CloudEvents 1.0 spec defines (the rest are extensions), and the
# extension names already checked against its rule (lower-case letters and digits).
_SPEC_ATTRIBUTES = frozenset(
    ("id", "source", "type", "specversion", "datacontenttype", "dataschema", "subject", "time")
)
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_extensions_ok: set[str] = set()


def _fast_attributes(headers: dict[str, bytes], key: bytes | None) -> dict[str, Any] | None:
    """The CloudEvent attributes of a binary-mode record, as ``from_binary`` reads them, or
    None when the record is not a plain valid one (the SDK then decides, and says why).

    The SDK builds a validated CloudEvent object and parses the time with dateutil, which
    cost more than the rest of a command's decision; this reads the same headers the same
    way (names lower-cased, ``ce_`` stripped, ``content-type`` as ``datacontenttype``, the
    key as ``partitionkey``) and applies the same checks, for the records we write.
    """
    attributes: dict[str, Any] = {}
    try:
        for name, raw in headers.items():
            name = name.lower()
            if name.startswith("ce_"):
                attributes[name[3:]] = raw.decode("utf-8")
            elif name == "content-type":
                attributes["datacontenttype"] = raw.decode("utf-8")
        if key is not None:
            attributes["partitionkey"] = key.decode("utf-8")
        if "time" in attributes:
            t = datetime.fromisoformat(attributes["time"])
            if t.tzinfo is None:
                return None
            attributes["time"] = t
    except (UnicodeDecodeError, ValueError):
        return None
    if (
        attributes.get("specversion") != "1.0"
        or not attributes.get("id")
        or not attributes.get("source")
        or not attributes.get("type")
    ):
        return None
    for optional in ("subject", "datacontenttype", "dataschema"):
        if optional in attributes and not attributes[optional]:
            return None
    for name in attributes.keys() - _SPEC_ATTRIBUTES:
        if name not in _extensions_ok:
            if name == "data" or not _EXTENSION_NAME.match(name):
                return None
            _extensions_ok.add(name)
    return attributes


def _ce_message(record: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode a consumer record into (CloudEvent attributes, JSON data)."""
    headers = {k: v for k, v in (record.headers or ())}
    if "ce_specversion" not in headers:
        raise DecodeError("not a CloudEvent: no ce_specversion header")
    attributes = _fast_attributes(headers, record.key)
    if attributes is not None and record.value and (
        attributes.get("datacontenttype", "application/json") == "application/json"
    ):
        try:
            data = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            data = None  # the SDK's reading decides (it returns the text)
        if isinstance(data, dict):
            return attributes, data
    try:
        ce = from_binary(
            KafkaMessage(headers=headers, key=record.key, value=record.value), _FORMAT
        )
    except Exception as exc:  # the SDK raises several types for bad attributes
        raise DecodeError(f"invalid CloudEvent: {exc}") from exc
    data = ce.get_data()
    if isinstance(data, (bytes, str)):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("data is not a JSON object")
    return ce.get_attributes(), data


def _header(value: Any) -> bytes:
    if isinstance(value, datetime):
        s = value.isoformat()
        return (s[:-6] + "Z" if s.endswith("+00:00") else s).encode("utf-8")
    return str(value).encode("utf-8")


def _model_json(model: BaseModel) -> bytes:
    """``model.model_dump(mode="json")`` as JSON bytes, serialized by pydantic in one step."""
    return model.__pydantic_serializer__.to_json(model)


def _json(data: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError: e.g. an integer wider than 64 bits
        return json.dumps(data).encode("utf-8")


def _to_record(topic: str, attributes: dict[str, Any], data: dict[str, Any] | bytes) -> Record:
    """The binary-mode record of a CloudEvent, byte for byte the headers and key that the
    SDK's ``to_binary`` writes (in the same order, ``specversion`` last) and its data as
    JSON (``data`` given as a dict, or as JSON bytes already).

    Attributes that the SDK would refuse (empty id, source, type or subject, a naive
    time) go through the SDK, which raises its validation error.
    """
    if (
        attributes.get("id") and attributes.get("source") and attributes.get("type")
        and attributes.get("subject", True)
        and (not isinstance(t := attributes.get("time"), datetime) or t.tzinfo is not None)
        and "specversion" not in attributes and "time" in attributes
    ):
        headers: Headers = []
        for name, value in attributes.items():
            if value is None:
                continue
            if name == "datacontenttype":
                headers.append(("content-type", str(value).encode("utf-8")))
            else:
                headers.append(("ce_" + name, _header(value)))
        headers.append(("ce_specversion", b"1.0"))
        key = attributes.get("partitionkey")
        value = data if isinstance(data, bytes) else _json(data)
        return Record(
            topic=topic, key=str(key).encode("utf-8") if key is not None else b"", value=value,
            headers=headers,
        )
    if isinstance(data, bytes):
        data = orjson.loads(data)
    message = to_binary(CloudEvent(attributes=attributes, data=data), _FORMAT)
    key = message.key.encode() if isinstance(message.key, str) else (message.key or b"")
    return Record(topic=topic, key=key, value=message.value or b"", headers=list(message.headers.items()))


def encode_event(topic: str, stored: StoredEvent) -> Record:
    """The Kafka record of ``stored`` for ``topic``."""
    return _to_record(
        topic,
        {
            "id": stored.id,
            "source": f"/swarmlog/{stored.aggregate_type}",
            "type": stored.type,
            "subject": stored.aggregate_id,
            "time": stored.time,
            "datacontenttype": "application/json",
            "partitionkey": stored.aggregate_id,
            "sequence": str(stored.version),
            "aggregatetype": stored.aggregate_type,
            "correlationid": stored.correlation_id,
            "causationid": stored.causation_id,
            "schemaversion": stored.event.schema_version,
        },
        _model_json(stored.event),
    )


def decode_event(record: Any) -> StoredEvent:
    """A consumer record of an event topic as a StoredEvent; DecodeError if it is not one."""
    attributes, data = _ce_message(record)
    ce_type = str(attributes.get("type", ""))
    parts = ce_type.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != TYPE_PREFIX or parts[2] not in DECIDERS:
        raise DecodeError(f"unknown event type {ce_type!r}")
    decider = DECIDERS[parts[2]]
    try:
        cls = decider.event_type(parts[3])
    except KeyError:
        raise DecodeError(f"unknown event type {ce_type!r}") from None
    version = int(attributes.get("schemaversion", 1))
    data = _upcast(ce_type, version, data, cls.schema_version)
    try:
        event = cls.model_validate(data)
        sequence = int(attributes["sequence"])
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    return StoredEvent(
        id=str(attributes["id"]),
        aggregate_type=parts[2],
        aggregate_id=str(attributes.get("subject", "")),
        version=sequence,
        time=attributes["time"],
        correlation_id=str(attributes.get("correlationid", "")),
        causation_id=str(attributes.get("causationid", "")),
        event=event,
        position=Position(record.topic, record.partition, record.offset),
    )


@dataclass(frozen=True)
class CommandEnvelope:
    """A command with its metadata, as carried on the command topic.

    ``command_id`` is the client's Idempotency-Key where given; ``expected_version`` is
    the aggregate version the client saw (HTTP If-Match), None for no check.
    """

    command_id: str
    command: Command
    correlation_id: str
    causation_id: str | None = None
    expected_version: int | None = None
    source: str = "/swarmlog/api"


def command_ce_type(command: Command | type[Command]) -> str:
    """``io.swarmlog.command.task.CompleteTask``."""
    cls = command if isinstance(command, type) else type(command)
    return f"{TYPE_PREFIX}.command.{cls.aggregate_type}.{cls.__name__}"


def encode_command(topic: str, env: CommandEnvelope) -> Record:
    """The Kafka record of a command envelope (keyed by aggregate id)."""
    attributes: dict[str, Any] = {
        "id": env.command_id,
        "source": env.source,
        "type": command_ce_type(env.command),
        "subject": env.command.aggregate_id,
        "time": env.command.at,
        "datacontenttype": "application/json",
        "partitionkey": env.command.aggregate_id,
        "aggregatetype": env.command.aggregate_type,
        "correlationid": env.correlation_id,
    }
    if env.causation_id:
        attributes["causationid"] = env.causation_id
    if env.expected_version is not None:
        attributes["expectedversion"] = env.expected_version
    return _to_record(topic, attributes, _model_json(env.command))


def decode_command(record: Any) -> CommandEnvelope:
    """A consumer record of the command topic as a CommandEnvelope; DecodeError if bad."""
    attributes, data = _ce_message(record)
    ce_type = str(attributes.get("type", ""))
    parts = ce_type.split(".")
    if len(parts) != 5 or parts[2] != "command" or parts[3] not in DECIDERS:
        raise DecodeError(f"unknown command type {ce_type!r}")
    try:
        cls = DECIDERS[parts[3]].command_type(parts[4])
    except KeyError:
        raise DecodeError(f"unknown command type {ce_type!r}") from None
    try:
        command = cls.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    expected = attributes.get("expectedversion")
    return CommandEnvelope(
        command_id=str(attributes["id"]),
        command=command,
        correlation_id=str(attributes.get("correlationid") or attributes["id"]),
        causation_id=attributes.get("causationid"),
        expected_version=int(expected) if expected is not None else None,
        source=str(attributes.get("source", "")),
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
    version: int
    events: list[dict[str, Any]] = []
    rejection: Rejection | None = None
    state: dict[str, Any] | None = None
    duplicate: bool = False
    decided_at: datetime


def encode_outcome(topic: str, outcome: Outcome) -> Record:
    """The Kafka record of an outcome, keyed by aggregate id (co-partitioned)."""
    return _to_record(
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
        _model_json(outcome),
    )


def decode_outcome(record: Any) -> Outcome:
    """A consumer record of the outcome topic as an Outcome; DecodeError if bad."""
    _, data = _ce_message(record)
    try:
        return Outcome.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"outcome: {exc}") from exc


def encode_dead_letter(topic: str, record: Any, reason: str, at: datetime) -> Record:
    """A dead-letter record for ``record`` that could not be processed, with ``reason``.

    The original key, value (as UTF-8 text where it is, else latin-1 escaped) and headers
    are kept, with where it came from, so nothing is lost.
    """
    def text(b: bytes | None) -> str | None:
        if b is None:
            return None
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.decode("latin-1")

    source = f"{record.topic}/{record.partition}/{record.offset}"
    return _to_record(
        topic,
        {
            "id": derived_id("deadletter", source),
            "source": "/swarmlog/deadletter",
            "type": f"{TYPE_PREFIX}.deadletter",
            "subject": source,
            "time": at,
            "datacontenttype": "application/json",
            "partitionkey": text(record.key) or source,
        },
        {
            "reason": reason,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": text(record.key),
            "value": text(record.value),
            "headers": {k: text(v) for k, v in (record.headers or ())},
        },
    )


"""CloudEvents 1.0 on the Kafka protocol binding, binary content mode, JSON data.

Every record swarmlog writes (commands, events, command outcomes, dead letters) is a
CloudEvent: attributes in ``ce_*`` headers, ``content-type: application/json``, the data
as the record value, the record key = the ``partitionkey`` extension = the aggregate id.
Any CloudEvents SDK or ``kcat`` can read the topics without our code.

Spec: CloudEvents 1.0.2 and its Kafka Protocol Binding; extensions used: ``sequence``
(the aggregate version, as a decimal string), ``partitionkey``, and our own
``aggregatetype``, ``correlationid``, ``causationid``, ``schemaversion`` and, on
commands, ``expectedversion`` (all lower-case alphanumeric, as the spec requires).

Reading is total: whatever a record holds (from any producer: missing or unparsable
``ce_*`` headers, header values that are not bytes, a time without a time zone, data
that is not a JSON object, an unknown type, a sequence, schema version or expected
version that is not an integer in [0 or 1, 2^63-1]), ``decode_event``,
``decode_command`` and ``decode_outcome`` raise ``DecodeError`` and nothing else, so
every reader can dead-letter the record and go on; ``encode_dead_letter`` and
``encode_dead_command`` never raise, and keep a dead letter under Kafka's 1 MiB.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

import orjson
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import BaseModel, Field

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
    s = t.astimezone(UTC).isoformat()
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
    """The CloudEvent attributes of a binary-mode record (its ``ce_*`` and ``content-type``
    headers, names lower-cased: see ``_ce_headers``), as ``from_binary`` reads them, or
    None when the record is not a plain valid one (the SDK then decides, and says why).

    The SDK builds a validated CloudEvent object and parses the time with dateutil, which
    cost more than the rest of a command's decision; this reads the same headers the same
    way (names lower-cased, ``ce_`` stripped, ``content-type`` as ``datacontenttype``, the
    key as ``partitionkey``) and applies the same checks, for the records we write.
    """
    attributes: dict[str, Any] = {}
    try:
        for name, raw in headers.items():  # names lower-cased by _ce_headers
            if name.startswith("ce_"):
                attributes[name[3:]] = raw.decode("utf-8")
            else:  # content-type: _ce_headers keeps no other
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


_REQUIRED_HEADERS = ("ce_specversion", "ce_id")
_INT8_MAX = 2**63 - 1
_DECIMAL = re.compile(r"-?[0-9]{1,19}")
#: The most characters of a header value quoted back in a DecodeError's reason.
_QUOTE = 80


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


def _integer(value: Any, name: str, minimum: int) -> int:
    """``value`` (a decimal string, as the ``sequence`` extension carries it, or an int)
    as an int in ``[minimum, 2**63 - 1]`` (what fits a PostgreSQL ``bigint``); DecodeError
    for anything else (``"1_000"``, ``" 7"``, ``"1e3"``, 20 digits...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    else:
        raise DecodeError(f"{name} is not an integer: {_quote(value)}")
    if not minimum <= number <= _INT8_MAX:
        raise DecodeError(f"{name} {number} is outside [{minimum}, 2^63-1]")
    return number


def is_json_media_type(content_type: Any) -> bool:
    """Whether a ``datacontenttype`` names JSON (``application/json``, ``...+json``,
    parameters allowed)."""
    if content_type == "application/json":
        return True
    if not isinstance(content_type, str):
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _ce_headers(record: Any) -> dict[str, bytes]:
    """The ``ce_*`` and ``content-type`` headers of ``record`` by lower-cased name (the
    other headers are not ours to read); DecodeError when one of them has no bytes value."""
    headers: dict[str, bytes] = {}
    for name, value in record.headers or ():
        if not isinstance(name, str):
            raise DecodeError(f"header name is not text: {_quote(name)}")
        lower = name.lower()
        if lower.startswith("ce_") or lower == "content-type":
            if value.__class__ is not bytes and not isinstance(value, bytes):
                raise DecodeError(f"header {name!r} has no bytes value: {_quote(value)}")
            headers[lower] = value
    return headers


def _ce_message(record: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode a consumer record into (CloudEvent attributes, JSON data); DecodeError for
    anything that is not a binary-mode CloudEvent with an id, a time with a time zone and a
    JSON object as its data. Total: nothing else is raised, whatever the record holds."""
    try:
        return _read_message(record)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"invalid CloudEvent: {type(exc).__name__}: {exc}") from exc


def _read_message(record: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    headers = _ce_headers(record)
    for required in _REQUIRED_HEADERS:
        if required not in headers:
            raise DecodeError(f"not a CloudEvent swarmlog wrote: no {required} header")
    key, value = record.key, record.value
    if key is not None and not isinstance(key, bytes):
        raise DecodeError(f"record key is not bytes: {_quote(key)}")
    if not isinstance(value, bytes) or not value:
        raise DecodeError("record has no data")
    attributes = _fast_attributes(headers, key)
    data: Any = None
    if attributes is not None and is_json_media_type(
        attributes.get("datacontenttype", "application/json")
    ):
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            data = None  # the SDK's reading decides (it returns the text)
    if attributes is None or not isinstance(data, dict):
        try:
            ce = from_binary(KafkaMessage(headers=headers, key=key, value=value), _FORMAT)
        except Exception as exc:  # the SDK raises several types for bad attributes
            raise DecodeError(f"invalid CloudEvent: {exc}") from exc
        attributes = ce.get_attributes()
        data = ce.get_data()
        if isinstance(data, (bytes, str)):
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"data is not JSON: {exc}") from exc
        elif isinstance(data, dict):
            # The SDK reads with the json module, which takes NaN, Infinity and integers of
            # any width: what every reader after us (orjson, jsonb) refuses. Read as orjson.
            try:
                data = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"data is not JSON (RFC 8259): {exc}") from exc
    if attributes.get("specversion") != "1.0":
        version = _quote(attributes.get("specversion"))
        raise DecodeError(f"CloudEvents spec version is not 1.0: {version}")
    content_type = attributes.get("datacontenttype", "application/json")
    if not is_json_media_type(content_type):
        raise DecodeError(f"data content type is not JSON: {_quote(content_type)}")
    if "ce_time" not in headers:
        # The SDK fills a missing time with the time of reading: the decoders require one
        # (``_require_time``), once they have said whether they know the type.
        attributes.pop("time", None)
    time = attributes.get("time")
    if time is not None and (not isinstance(time, datetime) or time.utcoffset() is None):
        raise DecodeError(f"time has no time zone: {_quote(time)}")
    if not isinstance(data, dict):
        raise DecodeError("data is not a JSON object")
    return attributes, data


def _require_time(attributes: dict[str, Any]) -> datetime:
    """The record's time; DecodeError when it had no ``ce_time`` header (every record
    swarmlog writes has one; an event's time is when its command was issued)."""
    time = attributes.get("time")
    if time is None:
        raise DecodeError("not a CloudEvent swarmlog wrote: no ce_time header")
    return time  # type: ignore[no-any-return]


_TIMED: dict[type, tuple[str, ...]] = {}


def _mentions_time(annotation: Any, seen: frozenset[type]) -> bool:
    if annotation is datetime:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return bool(_timed_fields(annotation, seen))
    return any(_mentions_time(arg, seen) for arg in get_args(annotation))


def _timed_fields(cls: type[BaseModel], seen: frozenset[type] = frozenset()) -> tuple[str, ...]:
    """The fields of ``cls`` that hold a datetime, directly or in a nested model."""
    known = _TIMED.get(cls)
    if known is not None:
        return known
    if cls in seen:
        return ()
    fields = tuple(
        name
        for name, info in cls.model_fields.items()
        if _mentions_time(info.annotation, seen | {cls})
    )
    if not seen:
        _TIMED[cls] = fields
    return fields


def _naive_time(value: Any) -> bool:
    """Whether ``value`` (a message, or what one of its fields holds) has a datetime with
    no time zone anywhere (only the fields that can hold one are looked at)."""
    if isinstance(value, datetime):
        return value.utcoffset() is None
    if isinstance(value, BaseModel):
        return any(_naive_time(getattr(value, name)) for name in _timed_fields(type(value)))
    if isinstance(value, (tuple, list)):
        return any(_naive_time(v) for v in value)
    if isinstance(value, dict):
        return any(_naive_time(v) for v in value.values())
    return False


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
        attributes.get("id")
        and attributes.get("source")
        and attributes.get("type")
        and attributes.get("subject", True)
        and (not isinstance(t := attributes.get("time"), datetime) or t.tzinfo is not None)
        and "specversion" not in attributes
        and "time" in attributes
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
            topic=topic,
            key=str(key).encode("utf-8") if key is not None else b"",
            value=value,
            headers=headers,
        )
    if isinstance(data, bytes):
        data = orjson.loads(data)
    message = to_binary(CloudEvent(attributes=attributes, data=data), _FORMAT)
    key = message.key.encode() if isinstance(message.key, str) else (message.key or b"")
    return Record(
        topic=topic, key=key, value=message.value or b"", headers=list(message.headers.items())
    )


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
    """A consumer record of an event topic as a StoredEvent; DecodeError if it is not one.

    Total: whatever the record holds (any headers, key and value, from any producer),
    nothing but DecodeError is raised. Beyond a valid CloudEvent (see ``_ce_message``) an
    event needs a known type, a ``subject`` (the aggregate id), a ``sequence`` in
    [1, 2^63-1], a ``schemaversion`` in [1, the event's current version] (upcast from an
    older one) and data that validates with no time lacking a time zone.
    """
    attributes, data = _ce_message(record)
    try:
        return _read_event(record, attributes, data)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{_quote(attributes.get('type'))}: {type(exc).__name__}: {exc}") from exc


def _read_event(record: Any, attributes: dict[str, Any], data: dict[str, Any]) -> StoredEvent:
    ce_type = str(attributes.get("type", ""))
    parts = ce_type.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != TYPE_PREFIX or parts[2] not in DECIDERS:
        raise DecodeError(f"unknown event type {_quote(ce_type)}")
    decider = DECIDERS[parts[2]]
    try:
        cls = decider.event_type(parts[3])
    except KeyError:
        raise DecodeError(f"unknown event type {_quote(ce_type)}") from None
    time = _require_time(attributes)
    version = _integer(attributes.get("schemaversion", "1"), "schemaversion", 1)
    if version > cls.schema_version:
        raise DecodeError(f"{ce_type}: schema version {version} is newer than {cls.schema_version}")
    sequence = _integer(attributes.get("sequence"), "sequence", 1)
    subject = attributes.get("subject")
    if not isinstance(subject, str) or not subject:
        raise DecodeError(f"{ce_type}: no subject (the aggregate id)")
    data = _upcast(ce_type, version, data, cls.schema_version)
    try:
        event = cls.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    if _naive_time(event):
        raise DecodeError(f"{ce_type}: a time in the data has no time zone")
    return StoredEvent(
        id=str(attributes["id"]),
        aggregate_type=parts[2],
        aggregate_id=subject,
        version=sequence,
        time=time,
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
    """A consumer record of the command topic as a CommandEnvelope; DecodeError if bad.

    Total, like ``decode_event``: a known command type whose data validates (no time
    without a time zone), and an ``expectedversion``, where there is one, in [0, 2^63-1].
    """
    attributes, data = _ce_message(record)
    try:
        return _read_command(attributes, data)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{_quote(attributes.get('type'))}: {type(exc).__name__}: {exc}") from exc


def _read_command(attributes: dict[str, Any], data: dict[str, Any]) -> CommandEnvelope:
    ce_type = str(attributes.get("type", ""))
    parts = ce_type.split(".")
    if (
        len(parts) != 5
        or ".".join(parts[:2]) != TYPE_PREFIX
        or parts[2] != "command"
        or parts[3] not in DECIDERS
    ):
        raise DecodeError(f"unknown command type {_quote(ce_type)}")
    try:
        cls = DECIDERS[parts[3]].command_type(parts[4])
    except KeyError:
        raise DecodeError(f"unknown command type {_quote(ce_type)}") from None
    _require_time(attributes)
    expected = attributes.get("expectedversion")
    expected_version = None if expected is None else _integer(expected, "expectedversion", 0)
    try:
        command = cls.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    if _naive_time(command):
        raise DecodeError(f"{ce_type}: a time in the data has no time zone")
    causation = attributes.get("causationid")
    return CommandEnvelope(
        command_id=str(attributes["id"]),
        command=command,
        correlation_id=str(attributes.get("correlationid") or attributes["id"]),
        causation_id=None if causation is None else str(causation),
        expected_version=expected_version,
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
    version: int = Field(ge=0, le=2**63 - 1)
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
    attributes, data = _ce_message(record)
    _require_time(attributes)
    try:
        outcome = Outcome.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"outcome: {exc}") from exc
    if outcome.decided_at.utcoffset() is None:
        raise DecodeError("outcome: decided_at has no time zone")
    return outcome


#: The most characters of a record's value a dead letter quotes (the rest is cut, and
#: said so), and of its key, each header and the reason: a dead letter stays well under
#: Kafka's 1 MiB even when every byte is escaped.
DEAD_LETTER_VALUE_CHARS = 64 * 1024
DEAD_LETTER_TEXT_CHARS = 4 * 1024
_DEAD_LETTER_HEADERS = 32
_DEAD_LETTER_HEADER_CHARS = 512


def _letter_text(value: Any, limit: int = DEAD_LETTER_TEXT_CHARS) -> str | None:
    """``value`` as text a dead letter can carry: bytes as UTF-8 where they are, else
    latin-1; text as it is; anything else by its repr; at most ``limit`` characters."""
    if value is None:
        return None
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
        else:
            text = value if isinstance(value, str) else repr(value)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    except Exception:  # noqa: BLE001 - a repr may raise; the dead letter must not
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters cut]"
    return text


def _letter_json(value: Any, limit: int = DEAD_LETTER_VALUE_CHARS) -> Any:
    """``value`` (a model, or JSON-like data) as JSON data a dead letter can carry, or
    as cut text when it is larger than ``limit`` characters of JSON."""

    def default(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        return _letter_text(obj)

    try:
        raw = orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)
    except Exception:  # noqa: BLE001 - e.g. an integer wider than 64 bits
        return _letter_text(value, limit)
    if len(raw) > limit:
        return _letter_text(raw, limit)
    return orjson.loads(raw)


def _field(record: Any, name: str) -> Any:
    try:
        return getattr(record, name, None)
    except Exception:  # noqa: BLE001 - a record-like object's property may raise
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _letter_time(at: Any) -> datetime:
    if not isinstance(at, datetime):
        return datetime.now(UTC)
    return at if at.utcoffset() is not None else at.replace(tzinfo=UTC)


def _dead_letter_record(topic: str, attributes: dict[str, Any], data: dict[str, Any]) -> Record:
    """``_to_record``, and if even that fails, a minimal CloudEvent written by hand."""
    try:
        return _to_record(topic, attributes, data)
    except Exception as exc:  # noqa: BLE001 - the last resort must write something
        headers: Headers = [
            ("ce_id", str(attributes["id"]).encode()),
            ("ce_source", b"/swarmlog/deadletter"),
            ("ce_type", str(attributes["type"]).encode()),
            ("ce_time", _header(datetime.now(UTC))),
            ("content-type", b"application/json"),
            ("ce_specversion", b"1.0"),
        ]
        body = {"reason": _letter_text(data.get("reason")), "unencodable": _letter_text(exc)}
        return Record(topic=topic, key=b"", value=orjson.dumps(body), headers=headers)


def encode_dead_letter(
    topic: str, record: Any, reason: str, at: datetime, *, by: str | None = None
) -> Record:
    """A dead-letter record for ``record`` that could not be processed, with ``reason``.

    The original key, value (as UTF-8 text where it is, else latin-1 escaped; a value
    over ``DEAD_LETTER_VALUE_CHARS`` characters is cut, and says so) and headers are
    kept, with where it came from, so nothing is lost. ``by`` names who dead-lettered
    it (the CloudEvent source, e.g. ``/swarmlog/scheduler``): each reader of a topic
    that gives up on a record writes its own dead letter, with its own id. Total: any
    record shape (no value, headers with no value, binary garbage) gives a record.
    """
    rec_topic = _letter_text(_field(record, "topic"))
    partition = _int_or_none(_field(record, "partition"))
    offset = _int_or_none(_field(record, "offset"))
    key = _letter_text(_field(record, "key"))
    headers: dict[str, str | None] = {}
    try:
        for name, value in list(_field(record, "headers") or ())[:_DEAD_LETTER_HEADERS]:
            name_text = _letter_text(name, _DEAD_LETTER_HEADER_CHARS) or ""
            headers[name_text] = _letter_text(value, _DEAD_LETTER_HEADER_CHARS)
    except Exception:  # noqa: BLE001 - headers that are not (name, value) pairs
        headers = {"": _letter_text(_field(record, "headers"))}
    source = f"{rec_topic}/{partition}/{offset}"
    data: dict[str, Any] = {
        "reason": _letter_text(reason),
        "topic": rec_topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        "value": _letter_text(_field(record, "value"), DEAD_LETTER_VALUE_CHARS),
        "headers": headers,
    }
    if by is not None:
        data["by"] = by
    return _dead_letter_record(
        topic,
        {
            "id": derived_id("deadletter", source, *(() if by is None else (by,))),
            "source": by or "/swarmlog/deadletter",
            "type": f"{TYPE_PREFIX}.deadletter",
            "subject": source,
            "time": _letter_time(at),
            "datacontenttype": "application/json",
            "partitionkey": key or source,
        },
        data,
    )


def encode_dead_command(
    topic: str,
    command_id: str,
    reason: str,
    at: datetime,
    *,
    by: str,
    command_type: str,
    command: Any = None,
) -> Record:
    """A dead-letter record for a command a process manager owes but could not build,
    encode or get accepted by Kafka (type ``io.swarmlog.deadletter.command``).

    ``command`` is the command if it was built, else the fields it was to be built from
    (as JSON data, or cut text over ``DEAD_LETTER_VALUE_CHARS`` characters); ``by`` names
    the process manager. Its id is derived from (command id, ``by``): the same command
    dead-lettered again has the same id. Total, like ``encode_dead_letter``.
    """
    cid = _letter_text(command_id) or ""
    return _dead_letter_record(
        topic,
        {
            "id": derived_id("deadletter", "command", cid, by),
            "source": by,
            "type": f"{TYPE_PREFIX}.deadletter.command",
            "subject": f"command/{cid}",
            "time": _letter_time(at),
            "datacontenttype": "application/json",
            "partitionkey": cid or "command",
        },
        {
            "reason": _letter_text(reason),
            "by": by,
            "command_id": cid,
            "command_type": _letter_text(command_type),
            "command": _letter_json(command),
        },
    )

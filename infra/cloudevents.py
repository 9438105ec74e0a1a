"""CloudEvents 1.0 on the Kafka protocol binding, binary content mode, JSON data.

Every record swarmlog writes (commands, events, command outcomes, dead letters) is a
CloudEvent: attributes in ``ce_*`` headers, ``content-type: application/json``, the data
as the record value, the record key = the ``partitionkey`` extension = the aggregate id.
Any CloudEvents SDK or ``kcat`` can read the topics without our code. This module is the
binding only: which attributes each kind of record carries is said once, where that kind
is written (infra/mapper.py for events, infra/envelope.py for commands, infra/outcome.py,
infra/deadletter_records.py).

Spec: CloudEvents 1.0.2 and its Kafka Protocol Binding; extensions used: ``sequence``
(the aggregate version, as a decimal string), ``partitionkey``, and our own
``aggregatetype``, ``correlationid``, ``causationid``, ``schemaversion`` and, on
commands, ``expectedversion`` (all lower-case alphanumeric, as the spec requires).

Reading is total: whatever a record holds (from any producer: missing or unparsable
``ce_*`` headers, header values that are not bytes, a time without a time zone, data
that is not a JSON object), ``read_binary`` raises ``DecodeError`` and nothing else, so
every reader can dead-letter the record and go on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

import orjson
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import BaseModel

TYPE_PREFIX = "io.swarmlog"
"""The prefix of every CloudEvent type swarmlog writes."""

_FORMAT = JSONFormat()

Headers = list[tuple[str, bytes]]


class DecodeError(ValueError):
    """A record that is not a CloudEvent swarmlog understands; goes to the dead-letter topic."""


@dataclass(frozen=True)
class Record:
    """A Kafka record ready to send: topic, key, value and headers."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers


def iso_time(t: datetime) -> str:
    """``t`` in RFC 3339 form in UTC, ``Z`` for ``+00:00`` (the JSON structured form)."""
    s = t.astimezone(UTC).isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


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


def quote(value: Any) -> str:
    """``repr(value)`` cut to ``_QUOTE`` characters, to name a bad value in a DecodeError."""
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


def integer(value: Any, name: str, minimum: int) -> int:
    """``value`` (a decimal string, as the ``sequence`` extension carries it, or an int)
    as an int in ``[minimum, 2**63 - 1]`` (what fits a PostgreSQL ``bigint``); DecodeError
    for anything else (``"1_000"``, ``" 7"``, ``"1e3"``, 20 digits...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    else:
        raise DecodeError(f"{name} is not an integer: {quote(value)}")
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
            raise DecodeError(f"header name is not text: {quote(name)}")
        lower = name.lower()
        if lower.startswith("ce_") or lower == "content-type":
            if value.__class__ is not bytes and not isinstance(value, bytes):
                raise DecodeError(f"header {name!r} has no bytes value: {quote(value)}")
            headers[lower] = value
    return headers


def read_binary(record: Any) -> tuple[dict[str, Any], dict[str, Any]]:
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
        raise DecodeError(f"record key is not bytes: {quote(key)}")
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
        version = quote(attributes.get("specversion"))
        raise DecodeError(f"CloudEvents spec version is not 1.0: {version}")
    content_type = attributes.get("datacontenttype", "application/json")
    if not is_json_media_type(content_type):
        raise DecodeError(f"data content type is not JSON: {quote(content_type)}")
    if "ce_time" not in headers:
        # The SDK fills a missing time with the time of reading: the decoders require one
        # (``require_time``), once they have said whether they know the type.
        attributes.pop("time", None)
    time = attributes.get("time")
    if time is not None and (not isinstance(time, datetime) or time.utcoffset() is None):
        raise DecodeError(f"time has no time zone: {quote(time)}")
    if not isinstance(data, dict):
        raise DecodeError("data is not a JSON object")
    return attributes, data


def require_time(attributes: dict[str, Any]) -> datetime:
    """The record's time; DecodeError when it had no ``ce_time`` header (every record
    swarmlog writes has one; an event's time is when its command was issued)."""
    time = attributes.get("time")
    if not isinstance(time, datetime):  # read_binary has checked any time it kept
        raise DecodeError("not a CloudEvent swarmlog wrote: no ce_time header")
    return time


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


def naive_time(value: Any) -> bool:
    """Whether ``value`` (a message, or what one of its fields holds) has a datetime with
    no time zone anywhere (only the fields that can hold one are looked at)."""
    if isinstance(value, datetime):
        return value.utcoffset() is None
    if isinstance(value, BaseModel):
        return any(naive_time(getattr(value, name)) for name in _timed_fields(type(value)))
    if isinstance(value, (tuple, list)):
        return any(naive_time(v) for v in value)
    if isinstance(value, dict):
        return any(naive_time(v) for v in value.values())
    return False


def header_value(value: Any) -> bytes:
    """An attribute as a ``ce_*`` header value: a time in RFC 3339 (``Z`` for UTC, the
    offset kept otherwise), anything else as its text, UTF-8."""
    if isinstance(value, datetime):
        s = value.isoformat()
        return (s[:-6] + "Z" if s.endswith("+00:00") else s).encode("utf-8")
    return str(value).encode("utf-8")


def model_json(model: BaseModel) -> bytes:
    """``model.model_dump(mode="json")`` as JSON bytes, serialized by pydantic in one step."""
    return model.__pydantic_serializer__.to_json(model)


def _json(data: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError: e.g. an integer wider than 64 bits
        return json.dumps(data).encode("utf-8")


def to_record(topic: str, attributes: dict[str, Any], data: dict[str, Any] | bytes) -> Record:
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
                headers.append(("ce_" + name, header_value(value)))
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


def structured(attributes: dict[str, Any], data: Any) -> dict[str, Any]:
    """The CloudEvent in JSON structured form (CloudEvents JSON Event Format) from the
    attributes ``to_record`` takes: ``specversion`` first, times in RFC 3339 UTC (``Z``),
    then ``data``; ``partitionkey`` is left out (it is the Kafka binding's record key)."""
    body: dict[str, Any] = {"specversion": "1.0"}
    for name, value in attributes.items():
        if name != "partitionkey" and value is not None:
            body[name] = iso_time(value) if isinstance(value, datetime) else value
    body["data"] = data
    return body

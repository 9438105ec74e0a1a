"""Dead-letter records: a record no reader could process, or a command a process manager
owes but could not write, as a CloudEvent on the dead-letter topic.

Both encoders are total (they never raise, whatever the record holds) and keep a dead
letter well under Kafka's 1 MiB.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from domain.ids import derived_id
from infra.cloudevents import TYPE_PREFIX, Headers, Record, header_value, to_record

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
    """``to_record``, and if even that fails, a minimal CloudEvent written by hand."""
    try:
        return to_record(topic, attributes, data)
    except Exception as exc:  # noqa: BLE001 - the last resort must write something
        headers: Headers = [
            ("ce_id", str(attributes["id"]).encode()),
            ("ce_source", b"/swarmlog/deadletter"),
            ("ce_type", str(attributes["type"]).encode()),
            ("ce_time", header_value(datetime.now(UTC))),
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

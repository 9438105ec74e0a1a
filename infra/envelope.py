"""Command envelopes: a command with its metadata, as a CloudEvent on the command topic.

The record is keyed by aggregate id; its type is ``io.swarmlog.command.<aggregate>.<Name>``;
``expectedversion`` carries the aggregate version the client saw (HTTP If-Match).
``decode_command`` is total: it raises DecodeError and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from domain.messages import Command
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
    to_record,
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
    return to_record(topic, attributes, model_json(env.command))


def decode_command(record: Any) -> CommandEnvelope:
    """A consumer record of the command topic as a CommandEnvelope; DecodeError if bad.

    Total, like ``decode_event`` (infra/mapper.py): a known command type whose data
    validates (no time without a time zone), and an ``expectedversion``, where there is
    one, in [0, 2^63-1].
    """
    attributes, data = read_binary(record)
    try:
        return _read_command(attributes, data)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{quote(attributes.get('type'))}: {type(exc).__name__}: {exc}") from exc


def _read_command(attributes: dict[str, Any], data: dict[str, Any]) -> CommandEnvelope:
    ce_type = str(attributes.get("type", ""))
    parts = ce_type.split(".")
    if (
        len(parts) != 5
        or ".".join(parts[:2]) != TYPE_PREFIX
        or parts[2] != "command"
        or parts[3] not in DECIDERS
    ):
        raise DecodeError(f"unknown command type {quote(ce_type)}")
    try:
        cls = DECIDERS[parts[3]].command_type(parts[4])
    except KeyError:
        raise DecodeError(f"unknown command type {quote(ce_type)}") from None
    require_time(attributes)
    expected = attributes.get("expectedversion")
    expected_version = None if expected is None else integer(expected, "expectedversion", 0)
    try:
        command = cls.model_validate(data)
    except Exception as exc:
        raise DecodeError(f"{ce_type}: {exc}") from exc
    if naive_time(command):
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

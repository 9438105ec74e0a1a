"""The codec writes and reads exactly what the CloudEvents SDK's Kafka binding does.

infra/cloudevents.py builds headers and reads them itself, on the hot path, instead of going
through the SDK's CloudEvent object: these tests hold it to the SDK, record by record,
so the topics stay readable by any CloudEvents SDK.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from domain.account import AccountState, PayReward, TransferSent
from domain.economy import TREASURY
from domain.ids import NAMESPACE, derived_id, event_id
from domain.messages import rejected
from domain.recorded import RecordedEvent
from infra.cloudevents import DecodeError, read_binary
from infra.deadletter_records import encode_dead_letter
from infra.envelope import CommandEnvelope, decode_command, encode_command
from infra.mapper import decode_event, encode_event
from infra.outcome import Outcome, decode_outcome, encode_outcome

AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


@dataclass
class ConsumerRecord:
    """What aiokafka hands a consumer: the fields the codec reads."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    topic: str = "t"
    partition: int = 0
    offset: int = 7


def _event() -> RecordedEvent:
    return RecordedEvent(
        id=event_id("cmd-1", 0),
        aggregate_type="account",
        aggregate_id=TREASURY,
        version=9,
        time=AT,
        correlation_id="corr-1",
        causation_id="cmd-1",
        event=TransferSent(
            account_id=TREASURY,
            to="acct-é",
            amount=10**18,
            kind="reward",
            task_id="task-1",
            cause="c",
        ),
    )


def _command(**kw: Any) -> CommandEnvelope:
    return CommandEnvelope(
        command_id="cmd-1",
        command=PayReward(account_id=TREASURY, to="acct-1", amount=3, task_id="t", at=AT),
        correlation_id="corr-1",
        source="/tests",
        **kw,
    )


def _outcome(**kw: Any) -> Outcome:
    return Outcome(
        command_id="cmd-1",
        command_type="PayReward",
        aggregate_type="account",
        aggregate_id=TREASURY,
        version=3,
        decided_at=AT + timedelta(microseconds=1),
        state=AccountState(account_id=TREASURY, balance=5).model_dump(mode="json"),
        **kw,
    )


def _records() -> list[Any]:
    bad = ConsumerRecord(key=None, value=b"\xff{", headers=[("h", b"\x00\xff")])
    return [
        encode_event("events", _event()),
        encode_command("commands", _command()),
        encode_command("commands", _command(causation_id="ev-1", expected_version=4)),
        encode_outcome("outcomes", _outcome(status="accepted", events=[{"id": "e", "offset": 1}])),
        encode_outcome(
            "outcomes",
            _outcome(
                status="rejected", rejection=rejected("conflict", "insufficient_balance", "no")
            ),
        ),
        encode_dead_letter("deadletter", bad, "unreadable", AT),
    ]


def _sdk_attributes(record: Any) -> tuple[dict[str, Any], Any]:
    ce = from_binary(
        KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value),
        JSONFormat(),
    )
    return ce.get_attributes(), ce.get_data()


@pytest.mark.parametrize("index", range(6))
def test_records_have_the_headers_and_key_the_sdk_writes_and_the_same_json_data(
    index: int,
) -> None:
    record = _records()[index]
    attributes, data = _sdk_attributes(record)  # in header order, specversion last
    sdk = to_binary(CloudEvent(attributes=attributes, data=data), JSONFormat())
    assert record.headers == list(sdk.headers.items())
    assert record.key == (sdk.key or "").encode()
    assert orjson.loads(record.value) == orjson.loads(sdk.value)


@pytest.mark.parametrize("index", range(6))
def test_reading_a_record_gives_what_the_sdk_reads(index: int) -> None:
    record = _records()[index]
    consumed = ConsumerRecord(key=record.key, value=record.value, headers=record.headers)
    assert read_binary(consumed) == _sdk_attributes(consumed)


def test_messages_round_trip() -> None:
    def consumed(r: Any) -> ConsumerRecord:
        return ConsumerRecord(key=r.key, value=r.value, headers=r.headers)

    stored = decode_event(consumed(encode_event("events", _event())))
    assert (stored.event, stored.time, stored.version) == (_event().event, AT, 9)
    env = _command(causation_id="ev-1", expected_version=4)
    assert decode_command(consumed(encode_command("commands", env))) == env
    outcome = _outcome(status="accepted")
    assert decode_outcome(consumed(encode_outcome("outcomes", outcome))) == outcome


def test_a_time_in_another_offset_reads_as_the_sdk_reads_it() -> None:
    record = encode_event("events", _event())
    headers = [
        (k, b"2025-03-04T07:06:07.5+02:00" if k == "ce_time" else v) for k, v in record.headers
    ]
    consumed = ConsumerRecord(key=record.key, value=record.value, headers=headers)
    attributes, _ = read_binary(consumed)
    assert attributes["time"] == datetime(
        2025, 3, 4, 7, 6, 7, 500000, tzinfo=timezone(timedelta(hours=2))
    )
    assert attributes == _sdk_attributes(consumed)[0]


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ({"ce_id": b""}, None),
        ({"ce_subject": b""}, None),
        ({"ce_time": b"2025-03-04T05:06:07"}, None),  # no time zone
        ({"ce_time": b"yesterday"}, None),
        ({"ce_Bad_Name": b"x"}, None),
        ({"ce_data": b"x"}, None),
        ({"ce_source": b"\xff"}, None),
        ({}, b"not json"),
        ({}, b"[1, 2]"),
        ({}, b""),
    ],
)
def test_a_record_that_is_not_a_valid_cloudevent_with_a_json_object_is_a_decode_error(
    change: dict[str, bytes], value: bytes | None
) -> None:
    record = encode_event("events", _event())
    headers = [(k, change.get(k, v)) for k, v in record.headers]
    headers += [(k, v) for k, v in change.items() if k not in dict(record.headers)]
    consumed = ConsumerRecord(
        key=record.key, value=record.value if value is None else value, headers=headers
    )
    with pytest.raises(DecodeError):
        decode_event(consumed)


def test_derived_ids_are_uuid5_of_their_parts() -> None:
    assert event_id("cmd-é", 2) == str(uuid.uuid5(NAMESPACE, "cmd-é/2"))
    assert derived_id("reward", "ev", 3) == str(uuid.uuid5(NAMESPACE, "reward/ev/3"))

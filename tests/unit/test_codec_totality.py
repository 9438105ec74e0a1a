"""Every decoder is total: whatever a record holds, from any producer, the only error that
comes out of ``decode_event``, ``decode_command`` and ``decode_outcome`` is DecodeError
(so the reader dead-letters the record and goes on), and ``encode_dead_letter`` never
fails at all (it is the last resort).

The generated records are arbitrary (header names and bytes, keys, values) and, to get
past the first checks, records we wrote with a few of their headers or their value
replaced, dropped or added.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain import task as tk
from domain.account import PayReward, TransferSent
from domain.economy import TREASURY
from infra.codec import (
    DEAD_LETTER_VALUE_CHARS,
    CommandEnvelope,
    DecodeError,
    Outcome,
    StoredEvent,
    _ce_message,
    decode_command,
    decode_event,
    decode_outcome,
    encode_command,
    encode_dead_command,
    encode_dead_letter,
    encode_event,
    encode_outcome,
    event_id,
)
from streams.leader import raw_ce_type

AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
DECODERS = (decode_event, decode_command, decode_outcome)


@dataclass
class ConsumerRecord:
    """What aiokafka hands a consumer: the fields the codec reads (of any type here)."""

    key: Any
    value: Any
    headers: Any
    topic: str = "t"
    partition: int = 0
    offset: int = 7


def _consumed(r: Any) -> ConsumerRecord:
    return ConsumerRecord(key=r.key, value=r.value, headers=list(r.headers))


def _event(event: Any = None, version: int = 9) -> StoredEvent:
    return StoredEvent(
        id=event_id("cmd-1", 0),
        aggregate_type=event.aggregate_type if event else "account",
        aggregate_id=TREASURY,
        version=version,
        time=AT,
        correlation_id="corr-1",
        causation_id="cmd-1",
        event=event
        or TransferSent(
            account_id=TREASURY, to="acct-1", amount=10, kind="reward", task_id="task-1", cause="c"
        ),
    )


def _good() -> list[ConsumerRecord]:
    """One record of each kind we write."""
    command = PayReward(account_id=TREASURY, to="acct-1", amount=3, task_id="t", at=AT)
    return [
        _consumed(encode_event("events", _event())),
        _consumed(
            encode_command(
                "commands",
                CommandEnvelope(
                    command_id="cmd-1", command=command, correlation_id="c", expected_version=4
                ),
            )
        ),
        _consumed(
            encode_outcome(
                "outcomes",
                Outcome(
                    command_id="cmd-1",
                    command_type="PayReward",
                    aggregate_type="account",
                    aggregate_id=TREASURY,
                    status="accepted",
                    version=3,
                    decided_at=AT,
                ),
            )
        ),
    ]


def _only_decode_errors(record: Any) -> None:
    for decode in DECODERS:
        with contextlib.suppress(DecodeError):
            decode(record)
    letter = encode_dead_letter("deadletter", record, "unreadable", AT, by="/tests")
    assert len(letter.value) < 1024 * 1024
    assert isinstance(orjson.loads(letter.value), dict)
    _ce_message(_consumed(letter))  # a dead letter is itself a CloudEvent we can read
    raw_ce_type(record)  # the runners' pre-decode filter reads the raw headers safely


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "ce_specversion",
            "ce_id",
            "ce_time",
            "ce_type",
            "ce_source",
            "ce_subject",
            "ce_sequence",
            "ce_schemaversion",
            "ce_expectedversion",
            "ce_partitionkey",
            "ce_correlationid",
            "ce_causationid",
            "content-type",
            "CE_TYPE",
            "Content-Type",
            "ce_data",
            "ce_",
            "ce_Bad-Name",
            "traceparent",
        ]
    ),
    st.text(max_size=20),
)
HEADER_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"1.0",
            b"0.3",
            b"",
            b"application/json",
            b"text/plain",
            b"application/cloudevents+json",
            b"io.swarmlog.account.transfer_sent",
            b"io.swarmlog.task.queued",
            b"io.swarmlog.command.account.PayReward",
            b"io.swarmlog.command.accepted",
            b"2025-03-04T05:06:07Z",
            b"2025-03-04T05:06:07",
            b"yesterday",
            b"1",
            b"0",
            b"-1",
            b"abc",
            b"1_000",
            b" 7",
            b"9" * 19,
            b"9" * 30,
            b"9" * 5000,
            str(2**63).encode(),
            str(2**63 - 1).encode(),
            "\uff15".encode(),
            b"\xff\xfe",
        ]
    ),
    st.text(max_size=10),  # not bytes at all
)
VALUES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'"x"', b"1", b"{", b'{"a": 1}', b"\xff{"]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda v: orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS) if _small_ints(v) else b"{}"),
    st.text(max_size=20),
)
KEYS = st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=5), st.integers())


def _small_ints(v: Any) -> bool:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return True
    if isinstance(v, int):
        return -(2**63) <= v < 2**64
    if isinstance(v, list):
        return all(_small_ints(x) for x in v)
    return all(_small_ints(x) for x in v.values())


HEADERS = st.lists(st.tuples(HEADER_NAMES | st.binary(max_size=5), HEADER_VALUES), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.one_of(st.none(), HEADERS), key=KEYS, value=VALUES)
def test_an_arbitrary_record_gives_only_decode_errors(headers: Any, key: Any, value: Any) -> None:
    _only_decode_errors(ConsumerRecord(key=key, value=value, headers=headers))


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, 2),
    changes=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES | st.just("drop")), max_size=4),
    value=st.one_of(st.just("keep"), VALUES),
    key=st.one_of(st.just("keep"), KEYS),
)
def test_a_record_we_wrote_with_headers_key_or_value_changed_gives_only_decode_errors(
    index: int, changes: list[tuple[str, Any]], value: Any, key: Any
) -> None:
    record = _good()[index]
    headers = list(record.headers)
    for name, new in changes:
        headers = [(k, v) for k, v in headers if k != name]
        if new != "drop":
            headers.append((name, new))
    _only_decode_errors(
        ConsumerRecord(
            key=record.key if key == "keep" else key,
            value=record.value if value == "keep" else value,
            headers=headers,
        )
    )


def test_records_we_wrote_still_decode() -> None:
    event, command, outcome = _good()
    assert decode_event(event).version == 9
    assert decode_command(command).expected_version == 4
    assert decode_outcome(outcome).version == 3
    for decode, record in (
        (decode_event, command),
        (decode_command, outcome),
        (decode_outcome, event),
    ):
        with pytest.raises(DecodeError):
            decode(record)


# --- one example of each malformation -----------------------------------------------


def _with(index: int, value: Any = "keep", key: Any = "keep", **headers: Any) -> ConsumerRecord:
    """Record ``index`` of ``_good()`` with headers set (a value of "drop" removes one)."""
    record = _good()[index]
    names = {k.replace("_", "-") if k == "content_type" else k: v for k, v in headers.items()}
    kept = [(k, v) for k, v in record.headers if k not in names]
    kept += [(k, v) for k, v in names.items() if v != "drop"]
    return ConsumerRecord(
        key=record.key if key == "keep" else key,
        value=record.value if value == "keep" else value,
        headers=kept,
    )


MALFORMED_ANY = {
    "no ce_time": {"ce_time": "drop"},
    "no ce_id": {"ce_id": "drop"},
    "no ce_specversion": {"ce_specversion": "drop"},
    "no ce_type": {"ce_type": "drop"},
    "no ce_source": {"ce_source": "drop"},
    "ce_time without a zone": {"ce_time": b"2025-03-04T05:06:07"},
    "ce_time not a time": {"ce_time": b"yesterday"},
    "ce_time not UTF-8": {"ce_time": b"\xff\xfe"},
    "ce_type not UTF-8": {"ce_type": b"\xffio.swarmlog"},
    "ce_id with no value": {"ce_id": None},
    "ce_type with no value": {"ce_type": None},
    "content-type with no value": {"content_type": None},
    "ce_time as text not bytes": {"ce_time": "2025-03-04T05:06:07Z"},
    "content type text/plain": {"content_type": b"text/plain"},
    "content type not UTF-8": {"content_type": b"\xff"},
    "unknown spec version": {"ce_specversion": b"0.3"},
}


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("case", sorted(MALFORMED_ANY))
def test_a_malformed_header_is_a_decode_error_for_every_decoder(index: int, case: str) -> None:
    record = _with(index, **MALFORMED_ANY[case])
    for decode in DECODERS:
        with pytest.raises(DecodeError):
            decode(record)


@pytest.mark.parametrize(
    ("value", "key", "headers"),
    [
        (b"not json", "keep", "keep"),
        (b"[1, 2]", "keep", "keep"),
        (b'"text"', "keep", "keep"),
        (b"null", "keep", "keep"),
        (b"", "keep", "keep"),
        (None, "keep", "keep"),
        ("{}", "keep", "keep"),  # text, not bytes
        ("keep", "a-key", "keep"),  # a key that is not bytes
        ("keep", "keep", None),
        ("keep", "keep", [(b"ce_id", b"x")]),  # a header name that is not text
        ("keep", "keep", [("ce_id",)]),  # not a (name, value) pair
    ],
)
def test_a_malformed_value_key_or_header_list_is_a_decode_error(
    value: Any, key: Any, headers: Any
) -> None:
    for index in range(3):
        record = _with(index, value=value, key=key)
        if headers != "keep":
            record.headers = headers if headers is None else list(record.headers) + headers
        for decode in DECODERS:
            with pytest.raises(DecodeError):
                decode(record)


def test_a_record_with_no_key_still_decodes() -> None:
    assert decode_event(_with(0, key=None)).aggregate_id == TREASURY


@pytest.mark.parametrize(
    "header",
    [
        {"ce_sequence": b"abc"},
        {"ce_sequence": b"0"},
        {"ce_sequence": b"-3"},
        {"ce_sequence": str(2**63).encode()},
        {"ce_sequence": b"9" * 5000},
        {"ce_sequence": b"1_000"},
        {"ce_sequence": b" 5"},
        {"ce_sequence": b"5\n"},
        {"ce_sequence": "\uff15".encode()},  # a full-width digit: int() would take it
        {"ce_sequence": "drop"},
        {"ce_schemaversion": b"abc"},
        {"ce_schemaversion": b"0"},
        {"ce_schemaversion": b"-1"},
        {"ce_schemaversion": b"2"},  # newer than the code knows
        {"ce_schemaversion": b"99999999999999999999"},
        {"ce_subject": "drop"},
        {"ce_type": b"io.swarmlog.account.no_such_event"},
        {"ce_type": b"io.swarmlog.no_such_aggregate.opened"},
        {"ce_type": b"com.example.account.transfer_sent"},
        {"ce_type": b"io.swarmlog.account"},
    ],
)
def test_an_event_with_a_bad_sequence_schema_version_subject_or_type_is_a_decode_error(
    header: dict[str, Any],
) -> None:
    with pytest.raises(DecodeError):
        decode_event(_with(0, **header))


def test_the_largest_sequence_that_fits_a_bigint_decodes() -> None:
    assert decode_event(_with(0, ce_sequence=str(2**63 - 1).encode())).version == 2**63 - 1


def test_event_data_that_does_not_validate_is_a_decode_error() -> None:
    data = orjson.loads(_good()[0].value)
    for bad in ({**data, "amount": "lots"}, {**data, "extra": 1}, {"to": "x"}):
        with pytest.raises(DecodeError):
            decode_event(_with(0, value=orjson.dumps(bad)))


def test_a_time_without_a_zone_in_event_data_is_a_decode_error() -> None:
    queued = encode_event(
        "events", _event(tk.TaskQueued(task_id="t-1", reason="retry", not_before=AT))
    )
    good = _consumed(queued)
    assert decode_event(good).event.not_before == AT  # type: ignore[attr-defined]
    naive = orjson.loads(good.value) | {"not_before": "2025-03-04T05:06:07"}
    with pytest.raises(DecodeError, match="time zone"):
        decode_event(ConsumerRecord(key=good.key, value=orjson.dumps(naive), headers=good.headers))


@pytest.mark.parametrize(
    "header",
    [
        {"ce_expectedversion": b"abc"},
        {"ce_expectedversion": b"-1"},
        {"ce_expectedversion": b""},
        {"ce_expectedversion": str(2**63).encode()},
        {"ce_expectedversion": b"4.0"},
        {"ce_type": b"io.swarmlog.command.account.NoSuchCommand"},
        {"ce_type": b"io.swarmlog.command.nothing.PayReward"},
        {"ce_type": b"com.example.command.account.PayReward"},
        {"ce_type": b"io.swarmlog.account.PayReward"},
    ],
)
def test_a_command_with_a_bad_expected_version_or_type_is_a_decode_error(
    header: dict[str, Any],
) -> None:
    with pytest.raises(DecodeError):
        decode_command(_with(1, **header))


def test_expected_versions_zero_and_the_largest_bigint_decode() -> None:
    assert decode_command(_with(1, ce_expectedversion=b"0")).expected_version == 0
    top = str(2**63 - 1).encode()
    assert decode_command(_with(1, ce_expectedversion=top)).expected_version == 2**63 - 1
    assert decode_command(_with(1, ce_expectedversion="drop")).expected_version is None


def test_a_command_at_without_a_zone_is_a_decode_error() -> None:
    data = orjson.loads(_good()[1].value) | {"at": "2025-03-04T05:06:07"}
    with pytest.raises(DecodeError):
        decode_command(_with(1, value=orjson.dumps(data)))


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2**63},
        {"version": -1},
        {"version": "x"},
        {"decided_at": "2025-03-04T05:06:07"},
        {"status": None},
    ],
)
def test_an_outcome_with_bad_data_is_a_decode_error(change: dict[str, Any]) -> None:
    data = orjson.loads(_good()[2].value) | change
    with pytest.raises(DecodeError):
        decode_outcome(_with(2, value=orjson.dumps(data)))


# --- dead letters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        ConsumerRecord(key=None, value=None, headers=None),
        ConsumerRecord(
            key=b"\xff\xfe", value=b"\x00\xff" * 10, headers=[("h", None), ("g", b"\xff")]
        ),
        ConsumerRecord(key="text", value="text", headers=[(b"\xff", 1), ("x", object())]),
        ConsumerRecord(key=b"k", value=b"v", headers=[("one",), 5]),
        ConsumerRecord(key=b"k", value=b"v", headers=7),
        object(),
    ],
)
def test_a_dead_letter_is_written_for_any_record_shape(record: Any) -> None:
    letter = encode_dead_letter("deadletter", record, "bad \ud800 reason", AT)
    attributes, data = _ce_message(_consumed(letter))
    assert attributes["type"] == "io.swarmlog.deadletter"
    assert data["reason"].startswith("bad ")


def test_a_dead_letter_keeps_the_record_and_names_who_wrote_it() -> None:
    record = ConsumerRecord(
        key=b"k-1",
        value=b"\xffgarbage",
        headers=[("ce_id", b"x"), ("n", None)],
        topic="p.task.events",
        partition=2,
        offset=41,
    )
    _, data = _ce_message(_consumed(encode_dead_letter("dl", record, "why", AT, by="/swarmlog/x")))
    assert data == {
        "reason": "why",
        "topic": "p.task.events",
        "partition": 2,
        "offset": 41,
        "key": "k-1",
        "value": "\xffgarbage",
        "headers": {"ce_id": "x", "n": None},
        "by": "/swarmlog/x",
    }
    plain = encode_dead_letter("dl", record, "why", AT)
    by_x = encode_dead_letter("dl", record, "why", AT, by="/swarmlog/x")
    assert dict(plain.headers)["ce_id"] != dict(by_x.headers)["ce_id"]
    assert dict(by_x.headers)["ce_source"] == b"/swarmlog/x"


def test_a_dead_letter_of_a_huge_record_is_cut_below_the_broker_limit() -> None:
    record = ConsumerRecord(
        key=b"k" * 100_000,
        value=b"\x01" * 2_000_000,
        headers=[(f"h{i}", b"\x02" * 50_000) for i in range(300)],
    )
    letter = encode_dead_letter("dl", record, "r" * 100_000, AT)
    assert len(letter.value) < 1024 * 1024
    _, data = _ce_message(_consumed(letter))
    assert data["value"].startswith("\x01" * DEAD_LETTER_VALUE_CHARS)
    assert data["value"].endswith("more characters cut]")


def test_a_dead_letter_of_a_command_that_could_not_be_built_carries_its_fields() -> None:
    letter = encode_dead_command(
        "dl",
        "cmd-1",
        "ValidationError: task_id too long",
        AT,
        by="/swarmlog/scheduler",
        command_type="AssignTask",
        command={"task_id": "t" * 200, "at": AT, "n": 2**70},
    )
    attributes, data = _ce_message(_consumed(letter))
    assert attributes["type"] == "io.swarmlog.deadletter.command"
    assert data["command_id"] == "cmd-1" and data["command_type"] == "AssignTask"
    assert data["by"] == "/swarmlog/scheduler"
    assert "task_id" in str(data["command"])
    built = PayReward(account_id=TREASURY, to="a", amount=1, task_id="t", at=AT)
    _, data = _ce_message(
        _consumed(
            encode_dead_command(
                "dl", "cmd-2", "too large", AT, by="/x", command_type="PayReward", command=built
            )
        )
    )
    assert data["command"]["amount"] == 1


def test_an_unknown_type_is_the_reason_given_before_a_missing_time() -> None:
    record = _with(1, ce_type=b"io.swarmlog.command.agent.LaunchRockets", ce_time="drop")
    with pytest.raises(DecodeError, match="LaunchRockets"):
        decode_command(record)
    with pytest.raises(DecodeError, match="no ce_time header"):
        decode_command(_with(1, ce_time="drop"))


def test_data_only_a_lenient_json_reader_takes_is_a_decode_error() -> None:
    # NaN sends the record down the SDK's path (the json module reads it, with an integer
    # of any width beside it); every reader after the codec (orjson, jsonb) refuses both.
    for index, decode in enumerate(DECODERS):  # _good(): an event, a command, an outcome
        value = _good()[index].value
        decode(_with(index))  # the record as written decodes
        lenient = value[:-1] + b',"nan":NaN,"wide":' + str(2**70).encode() + b"}"
        with pytest.raises(DecodeError, match="not JSON"):
            decode(_with(index, value=lenient))

"""The event contract: the recorded-event envelope, the CloudEvents binding and the
mapping of domain events with their upcasters.

TokensUnstaked is at schema version 2 (``released`` added, declared with its upcaster
on the class): a version-1 record, as the log holds it, is read through the default
mapper. WorkflowRunCompleted changed shape (``result`` to ``result_steps``) by keeping
both fields at version 1; a test reads its real version-1 record, in its old shape,
through a version-2 declaration of the same event made here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import grimp
import orjson
import pytest

from domain import account as ac
from domain import workflow_run as wr
from domain.ids import event_id
from domain.messages import Event
from domain.recorded import Position, RecordedEvent
from infra.cloudevents import DecodeError
from infra.mapper import EVENTS, EventMapper, decode_event, encode_event, event_json
from infra.outcome import Outcome, WrittenEvent, decode_outcome, encode_outcome

AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


@dataclass
class ConsumerRecord:
    """What aiokafka hands a consumer: the fields the readers use."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    topic: str = "runs"
    partition: int = 2
    offset: int = 41


def _consumed(record: Any) -> ConsumerRecord:
    return ConsumerRecord(key=record.key, value=record.value, headers=list(record.headers))


def _recorded(
    event: Event,
    time: datetime = AT,
    *,
    aggregate: tuple[str, str] = (wr.RUN, "run-1"),
    command_id: str = "cmd-run",
) -> RecordedEvent:
    return RecordedEvent(
        id=event_id(command_id, 3),
        aggregate_type=aggregate[0],
        aggregate_id=aggregate[1],
        version=7,
        time=time,
        correlation_id="corr-1",
        causation_id=command_id,
        event=event,
    )


def _name_final_steps(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2 of a completed run: the final steps named, not their results copied."""
    upgraded = dict(data)
    result = upgraded.pop("result", None)
    if not upgraded.get("result_steps"):
        upgraded["result_steps"] = list(result or ())
    return upgraded


class WorkflowRunCompletedV2(wr.RunEvent):
    """WorkflowRunCompleted as a version 2 would declare it: no ``result`` any more."""

    event_type: ClassVar[str] = "completed"
    schema_version: ClassVar[int] = 2
    upcasters = (_name_final_steps,)
    result_steps: tuple[str, ...]


def _runs_at_version_2() -> EventMapper:
    others = [c for c in wr.RUN_DECIDER.event_types if c is not wr.WorkflowRunCompleted]
    return EventMapper({wr.RUN: (WorkflowRunCompletedV2, *others)})


def test_a_version_1_record_of_a_completed_run_is_upcast_to_the_version_its_reader_declares() -> (
    None
):
    old = wr.WorkflowRunCompleted(run_id="run-1", result={"fetch": {"n": 1}, "report": None})
    record = _consumed(encode_event("runs", _recorded(old)))
    assert dict(record.headers)["ce_schemaversion"] == b"1"

    read = decode_event(record, _runs_at_version_2())

    assert read.event == WorkflowRunCompletedV2(run_id="run-1", result_steps=("fetch", "report"))
    assert (read.id, read.version, read.time) == (event_id("cmd-run", 3), 7, AT)
    assert read.position == Position("runs", 2, 41)
    # The mapper of the domain as it is reads the same record as the class it has.
    today = decode_event(record)
    assert isinstance(today.event, wr.WorkflowRunCompleted)
    assert today.event.final_steps == ("fetch", "report")


def test_a_version_1_record_in_the_new_shape_keeps_its_steps_through_the_upcaster() -> None:
    new = wr.WorkflowRunCompleted(run_id="run-1", result_steps=("report",))
    read = decode_event(_consumed(encode_event("runs", _recorded(new))), _runs_at_version_2())
    assert read.event == WorkflowRunCompletedV2(run_id="run-1", result_steps=("report",))


def test_a_record_newer_than_its_reader_is_a_decode_error_not_a_guess() -> None:
    newer = WorkflowRunCompletedV2(run_id="run-1", result_steps=("a",))
    record = _consumed(encode_event("runs", _recorded(newer)))
    assert dict(record.headers)["ce_schemaversion"] == b"2"
    assert decode_event(record, _runs_at_version_2()).event == newer
    with pytest.raises(DecodeError, match="schema version 2 is newer than 1"):
        decode_event(record, EVENTS)


def test_a_mapper_refuses_an_event_whose_upcasters_do_not_reach_its_version() -> None:
    class Skipping(wr.RunEvent):
        event_type: ClassVar[str] = "completed"
        schema_version: ClassVar[int] = 3
        upcasters = (_name_final_steps,)

    with pytest.raises(ValueError, match="declares 1 upcasters, not 2"):
        EventMapper({wr.RUN: (Skipping,)})


def test_every_domain_event_declares_the_upcasters_its_version_needs() -> None:
    # EVENTS is built from every decider: building it checked each class.
    for ce_type in ("io.swarmlog.task.assigned", "io.swarmlog.workflow_run.completed"):
        aggregate_type, cls = EVENTS.resolve(ce_type)
        assert len(cls.upcasters) == cls.schema_version - 1
        assert ce_type == f"io.swarmlog.{aggregate_type}.{cls.event_type}"


def test_the_json_form_lists_the_attributes_of_the_record_and_its_position() -> None:
    east = timezone(timedelta(hours=2))
    recorded = _recorded(
        wr.WorkflowRunCompleted(run_id="run-1", result_steps=("a",)),
        time=AT.astimezone(east),
    )
    record = encode_event("runs", recorded)
    headers = dict(record.headers)
    read = decode_event(_consumed(record))

    body = event_json(read)

    assert list(body) == [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "sequence",
        "aggregatetype",
        "correlationid",
        "causationid",
        "schemaversion",
        "data",
        "position",
    ]
    for name in ("id", "source", "type", "subject", "sequence", "correlationid", "causationid"):
        assert body[name] == headers[f"ce_{name}"].decode()
    assert headers["ce_time"] == b"2025-03-04T07:06:07.890123+02:00"
    assert body["time"] == "2025-03-04T05:06:07.890123Z"
    assert body["schemaversion"] == 1 and body["sequence"] == "7"
    assert body["data"] == orjson.loads(record.value)
    assert body["position"] == {"topic": "runs", "partition": 2, "offset": 41}
    assert "position" not in event_json(recorded)


def test_an_outcome_lists_its_events_typed_with_only_the_keys_it_knows_on_the_wire() -> None:
    listed = WrittenEvent(id="e1", type="io.swarmlog.task.queued", version=2, topic="tasks")
    written = listed.at(partition=1, offset=9)
    outcome = Outcome(
        command_id="c1",
        command_type="SubmitTask",
        aggregate_type="task",
        aggregate_id="t1",
        status="accepted",
        version=2,
        events=[written, written.bare()],
        decided_at=AT,
    )
    record = encode_outcome("outcomes", outcome)

    assert orjson.loads(record.value)["events"] == [
        {
            "id": "e1",
            "type": "io.swarmlog.task.queued",
            "version": 2,
            "topic": "tasks",
            "partition": 1,
            "offset": 9,
        },
        {"id": "e1", "version": 2, "partition": 1, "offset": 9},
    ]
    read = decode_outcome(_consumed(record))
    assert read.events == [written, written.bare()]
    assert read.events[0].position == Position("tasks", 1, 9)
    assert read.events[1].position is None and listed.position is None


PURE = ("streams.scheduler", "streams.economy", "streams.workflow", "projections.views")


@pytest.mark.parametrize("module", PURE)
def test_the_process_managers_and_views_read_the_envelope_without_infra(module: str) -> None:
    graph = grimp.build_graph("domain", "infra", "streams", "projections", "commands")
    imported = graph.find_modules_directly_imported_by(module)
    assert "domain.recorded" in imported
    assert sorted(m for m in imported if m.split(".")[0] == "infra") == []


def test_a_version_1_tokens_unstaked_record_is_upcast_by_the_default_mapper() -> None:
    # As the log holds it: written before ``released`` existed, at schema version 1.
    event = ac.TokensUnstaked(account_id="acct-1", amount=70)
    recorded = _recorded(event, aggregate=(ac.ACCOUNT, "acct-1"), command_id="cmd-withdraw")
    record = _consumed(encode_event("accounts", recorded))
    assert dict(record.headers)["ce_schemaversion"] == b"2"  # what is written now
    data = orjson.loads(record.value)
    del data["released"]
    record.value = orjson.dumps(data)
    record.headers = [
        (name, b"1" if name == "ce_schemaversion" else value) for name, value in record.headers
    ]

    read = decode_event(record)

    assert isinstance(read.event, ac.TokensUnstaked)
    assert read.event.amount == 70 and read.event.released is None
    # A version newer than the class's is refused, never guessed at.
    record.headers = [
        (name, b"3" if name == "ce_schemaversion" else value) for name, value in record.headers
    ]
    with pytest.raises(DecodeError, match="newer"):
        decode_event(record)

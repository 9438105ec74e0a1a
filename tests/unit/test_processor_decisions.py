"""One command's decision in the command processor, without Kafka: whatever goes wrong
with one command ends that command alone, as a typed rejection, and nothing it staged is
kept; an event that would not fit one Kafka record is rejected before anything is written;
an outcome that would not fit is shrunk, never dropped."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from commands.processor import (
    CommandProcessor,
    PartitionState,
    describe_size,
    internal_error,
    record_size,
)
from domain import agent as ag
from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.registry import DECIDERS
from infra.bootstrap import Clients, build_processor
from infra.clock import SystemClock
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.outcome import Outcome, decode_outcome
from infra.settings import Settings
from infra.topics import Topics

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclasses.dataclass
class _ConsumerRecord:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def env(command: Any, command_id: str = "cmd-1") -> CommandEnvelope:
    return CommandEnvelope(command_id=command_id, command=command, correlation_id=command_id)


def record_at(offset: int = 7) -> _ConsumerRecord:
    return _ConsumerRecord("t.commands", 0, offset, b"a1", b"{}", [])


@pytest.fixture
async def processor() -> AsyncIterator[CommandProcessor]:
    # Built inside a running loop (aiokafka's clients want one); nothing connects.
    settings = Settings(processor_outcome_cache_bytes=1024, record_max_bytes=64 * 1024)
    p = build_processor(
        Clients(settings, Kafka("127.0.0.1:9"), Topics(prefix="unit"), SystemClock())
    )
    yield p
    await p.consumer.stop()


def partition_with(*events: Any) -> PartitionState:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]  # deciding writes nothing
    state = DECIDERS["agent"].fold(events)
    ps.aggregates[("agent", "a1")] = (state, len(events))
    return ps


REGISTERED = ag.AgentRegistered(
    agent_id="a1", name="a1", capabilities=(), max_concurrent_tasks=1, cost_per_task=0
)
STARTED = ag.AgentStarted(agent_id="a1")


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


async def test_a_decider_that_raises_rejects_that_command_as_an_internal_error_and_dead_letters_it(
    processor: CommandProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = DECIDERS["agent"]

    def decide(command: Any, state: Any) -> Any:
        if isinstance(command, ag.RecordHeartbeat):
            _recurse(0)
        return real.decide(command, state)

    monkeypatch.setitem(DECIDERS, "agent", dataclasses.replace(real, decide=decide))
    ps = partition_with(REGISTERED, STARTED)
    staged: dict[Any, Any] = {}

    decision = processor._decide_safely(
        ps, 0, record_at(), env(ag.RecordHeartbeat(agent_id="a1", at=AT)), staged
    )

    out = decision.outcome
    assert out.status == "rejected" and out.rejection is not None
    assert (out.rejection.kind, out.rejection.code) == ("invalid", "internal_error")
    assert out.rejection.detail.startswith("RecursionError: maximum recursion depth exceeded")
    assert "Traceback" not in out.rejection.detail and "File " not in out.rejection.detail
    assert out.version == 2 and decision.events == [] and decision.staged is None
    assert decision.dead_letter is not None and "RecursionError" in decision.dead_letter
    assert staged == {} and processor.internal_errors == 1


async def test_state_staged_by_a_command_that_fails_half_way_does_not_leak(
    processor: CommandProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = DECIDERS["agent"]

    def decide(command: Any, state: Any) -> Any:
        if isinstance(command, ag.RestartAgent):  # two events; evolving the second raises
            return [ag.AgentRestarted(agent_id="a1"), ag.AgentStopped(agent_id="a1")]
        return real.decide(command, state)

    def evolve(state: Any, event: Any) -> Any:
        if isinstance(event, ag.AgentStopped) and state.lifecycle == "running":
            raise ValueError("cannot stop what just restarted")
        return real.evolve(state, event)

    monkeypatch.setitem(DECIDERS, "agent", dataclasses.replace(real, decide=decide, evolve=evolve))
    ps = partition_with(REGISTERED)
    staged: dict[Any, Any] = {}

    failed = processor._decide_safely(
        ps, 0, record_at(1), env(ag.RestartAgent(agent_id="a1", at=AT), "c1"), staged
    )
    after = processor._decide_safely(
        ps, 0, record_at(2), env(ag.StartAgent(agent_id="a1", at=AT), "c2"), staged
    )

    assert failed.outcome.rejection is not None
    assert failed.outcome.rejection.detail == "ValueError: cannot stop what just restarted"
    assert failed.staged is None and failed.events == []
    # The next command is decided on the state before the failed one: registered, version 1.
    assert (after.outcome.status, after.outcome.version) == ("accepted", 2)
    assert after.staged is not None and after.staged[0].lifecycle == "running"


async def test_an_event_larger_than_a_record_is_rejected_before_anything_is_written(
    processor: CommandProcessor,
) -> None:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]
    big = tk.SubmitTask(task_id="t1", type="work", payload={"blob": "x" * 100_000}, at=AT)

    decision = processor._decide_safely(ps, 0, record_at(), env(big), {})

    rejection = decision.outcome.rejection
    assert decision.outcome.status == "rejected" and rejection is not None
    assert (rejection.kind, rejection.code) == ("invalid", "too_large")
    assert rejection.detail.startswith("event task.submitted is 98.2 KiB (100,5")
    assert rejection.detail.endswith("the record limit is 64 KiB (65,536 bytes)")
    assert decision.events == [] and decision.staged is None and decision.dead_letter is None
    assert decision.outcome.version == 0


async def test_events_that_fit_are_encoded_and_checked_but_not_sent(
    processor: CommandProcessor,
) -> None:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]
    task = tk.SubmitTask(task_id="t1", type="work", payload={"blob": "x" * 1000}, at=AT)

    decision = processor._decide_safely(ps, 0, record_at(), env(task), {})

    assert decision.outcome.status == "accepted" and len(decision.events) == 2
    assert all(record_size(r) <= processor.record_max_bytes for r in decision.events)
    assert decision.staged is not None and decision.staged[1] == 2
    assert ps.aggregates == {}, "nothing is committed to the partition's state by deciding"


async def test_a_map_start_is_packed_into_events_that_each_fit_a_record(
    processor: CommandProcessor,
) -> None:
    spec = wf.WorkflowSpec(
        steps=(
            wf.StepSpec(
                id="a",
                task_type="work",
                map=wf.MapSpec(items="inputs.xs", max_parallelism=200),
            ),
        )
    )
    start = wr.StartWorkflowRun(
        run_id="r1", workflow_id="w", version=1, spec=spec, inputs={"xs": ["x" * 100] * 200}, at=AT
    )
    ps = PartitionState(producer=None)  # type: ignore[arg-type]

    decision = processor._decide_safely(ps, 0, record_at(), env(start), {})

    # ~55 KiB of units: one event as decided, four as written at a 64 KiB record limit
    assert decision.outcome.status == "accepted"
    types = [e.type for e in decision.outcome.events]
    assert types.count("io.swarmlog.workflow_run.step_tasks_scheduled") == 4
    assert all(record_size(r) <= processor.record_max_bytes // 2 for r in decision.events)
    assert decision.staged is not None
    assert decision.staged[0].steps["a"].units.keys() == set(range(200))


async def test_an_outcome_too_large_for_a_record_is_written_without_its_state(
    processor: CommandProcessor,
) -> None:
    outcome = Outcome(
        command_id="c1",
        command_type="SubmitTask",
        aggregate_type="task",
        aggregate_id="t1",
        status="accepted",
        version=2,
        events=[
            {
                "id": "e1",
                "type": "io.swarmlog.task.submitted",
                "version": 1,
                "topic": "unit.task.events",
                "partition": 0,
                "offset": 5,
            }
        ],
        state={"payload": "y" * 100_000},
        decided_at=AT,
    )

    record = processor._outcome_record(outcome)

    assert record_size(record) <= processor.record_max_bytes
    written = decode_outcome(_ConsumerRecord("t", 0, 0, record.key, record.value, record.headers))
    assert written.state is None
    assert (written.events, written.version, written.status) == (outcome.events, 2, "accepted")


async def test_a_rejection_with_a_huge_detail_is_cut_short_to_fit(
    processor: CommandProcessor,
) -> None:
    outcome = Outcome(
        command_id="c1",
        command_type="StartAgent",
        aggregate_type="agent",
        aggregate_id="a1",
        status="rejected",
        version=0,
        rejection=internal_error(ValueError("z" * 200_000)),
        decided_at=AT,
    )

    record = processor._outcome_record(outcome)

    written = decode_outcome(_ConsumerRecord("t", 0, 0, record.key, record.value, record.headers))
    assert written.rejection is not None and written.rejection.code == "internal_error"
    assert record_size(record) <= processor.record_max_bytes


async def test_a_command_to_an_aggregate_whose_events_could_not_be_replayed_is_an_internal_error(
    processor: CommandProcessor,
) -> None:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]
    ps.broken[("agent", "a1")] = "KeyError: 'x'"

    decision = processor._decide_safely(
        ps, 0, record_at(), env(ag.StartAgent(agent_id="a1", at=AT)), {}
    )

    assert decision.outcome.rejection is not None
    assert decision.outcome.rejection.code == "internal_error"
    assert "could not be replayed: KeyError" in decision.outcome.rejection.detail
    assert decision.dead_letter is not None


def test_an_internal_error_names_the_exception_type_and_message_only() -> None:
    assert internal_error(KeyError("k")).detail == "KeyError: 'k'"
    assert internal_error(RuntimeError()).detail == "RuntimeError"
    long = internal_error(ValueError("v" * 10_000)).detail
    assert len(long) < 2100 and long.endswith("...")


def test_sizes_are_described_in_binary_units_and_bytes() -> None:
    assert describe_size(1024 * 1024) == "1 MiB (1,048,576 bytes)"
    assert describe_size(1_363_190) == "1.3 MiB (1,363,190 bytes)"
    assert describe_size(65_536) == "64 KiB (65,536 bytes)"


class _CapturingProducer:
    """Stands in for AIOKafkaProducer.send: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, value: bytes, key: bytes, headers: Any) -> Any:
        self.sent.append((topic, value, key, headers))
        return None


async def test_a_dead_letter_too_large_for_a_record_keeps_the_start_of_the_value_and_says_so(
    processor: CommandProcessor,
) -> None:
    producer = _CapturingProducer()
    ps = PartitionState(producer=producer)  # type: ignore[arg-type]
    huge = _ConsumerRecord("t.commands", 1, 42, b"a1", b"v" * 200_000, [("ce_id", b"c9")])

    await processor._dead_letter(ps, huge, "internal_error: ValueError: bad")

    [(topic, value, _key, _headers)] = producer.sent
    letter = json.loads(value)
    assert topic == "unit.deadletter" and (letter["partition"], letter["offset"]) == (1, 42)
    assert letter["reason"] == (
        "internal_error: ValueError: bad (record cut to 16,384 of 200,000 bytes)"
    )
    assert letter["value"] == "v" * 16_384 and letter["headers"] == {"ce_id": "c9"}
    assert len(value) < processor.record_max_bytes


async def test_an_unreadable_command_record_that_names_its_id_and_type_gets_an_outcome(
    processor: CommandProcessor,
) -> None:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]
    rec = _ConsumerRecord(
        "t.commands",
        0,
        3,
        b"a1",
        b"{}",
        [
            ("ce_id", b"c-7"),
            ("ce_type", b"io.swarmlog.command.agent.StartAgent"),
        ],
    )
    rejection = internal_error(ValueError("invalid literal for int() with base 10: 'abc'"))

    outcome = processor._unreadable_outcome(ps, rec, rejection)
    nameless = processor._unreadable_outcome(
        ps, _ConsumerRecord("t.commands", 0, 4, b"a1", b"{}", []), rejection
    )

    assert outcome is not None and nameless is None
    assert (outcome.command_id, outcome.command_type, outcome.aggregate_id) == (
        "c-7",
        "StartAgent",
        "a1",
    )
    assert outcome.status == "rejected" and outcome.rejection == rejection


async def test_an_unreadable_command_record_with_null_header_values_gets_no_outcome_and_no_error(
    processor: CommandProcessor,
) -> None:
    ps = PartitionState(producer=None)  # type: ignore[arg-type]
    rejection = internal_error(ValueError("bad"))
    for headers in (
        [("ce_id", None), ("ce_type", b"io.swarmlog.command.agent.StartAgent")],
        [("ce_id", b"c-8"), ("ce_type", None)],
    ):
        rec = _ConsumerRecord("t.commands", 0, 5, None, None, headers)
        assert processor._unreadable_outcome(ps, rec, rejection) is None

"""What a process-manager runner does with poison, without Kafka: a producer stand-in
(the two methods of aiokafka's producer the runner calls) refuses some records.

A command Kafka refuses (too large) is dead-lettered once and never sent again; one not
written because Kafka is unavailable is not dead-lettered, and is sent again on the
next try; an event record that does not decode, or whose fold raises, is dead-lettered
once however often the log is folded again.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from domain import task as tk
from domain.recorded import RecordedEvent
from infra.bootstrap import Clients, build_scheduler
from infra.clock import ManualClock
from infra.kafka import Kafka
from infra.mapper import encode_event
from infra.settings import Settings
from infra.topics import Topics
from streams.leader import raw_ce_type, record_fault
from streams.scheduler_runner import SchedulerRunner

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Producer:
    """Records what is sent; a command for task ``too-big`` is refused at once, one for
    task ``down`` fails as when Kafka is unavailable."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []  # (topic, key) of every attempt
        self.values: dict[str, list[bytes]] = {}  # topic -> values written
        self.offset = 0

    async def send(self, topic: str, value: bytes, key: bytes, headers: Any) -> asyncio.Future[Any]:
        self.sent.append((topic, key))
        if key == b"too-big":
            raise MessageSizeTooLargeError("the message is 2000000 bytes")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if key == b"down":
            fut.set_exception(KafkaTimeoutError())
        else:
            self.offset += 1
            self.values.setdefault(topic, []).append(value)
            fut.set_result(SimpleNamespace(partition=0, offset=self.offset))
        return fut


def _runner() -> tuple[SchedulerRunner, Any, Producer]:
    producer = Producer()
    clients = Clients(Settings(), Kafka("unused:9092"), Topics(prefix="u"), ManualClock(start=AT))
    runner = build_scheduler(clients)
    return runner, SimpleNamespace(producer=producer), producer


def _assign(task_id: str) -> tuple[str, tk.AssignTask, int]:
    return (f"cmd-{task_id}", tk.AssignTask(task_id=task_id, agent_id="a", at=AT), 1)


def test_record_faults_are_the_records_own_and_kafka_being_down_is_not() -> None:
    assert record_fault(MessageSizeTooLargeError())
    assert record_fault(ValueError("not serializable"))
    assert not record_fault(KafkaTimeoutError())
    assert not record_fault(asyncio.CancelledError())


async def test_a_refused_command_is_dead_lettered_once_and_an_unsent_one_is_retried() -> None:
    runner, client, producer = _runner()
    planned = [_assign("too-big"), _assign("down"), _assign("ok")]

    written = await runner.send(client, planned)
    assert [w is not None for w in written] == [False, False, True]
    assert runner.dead_commands == {"cmd-too-big"}
    await runner.flush_dead_letters(client)
    [letter] = [orjson.loads(v) for v in producer.values["u.deadletter"]]
    assert letter["command_id"] == "cmd-too-big" and runner.dead_letters == 1
    assert letter["reason"].startswith("Kafka refused the command: MessageSizeTooLargeError")

    producer.sent.clear()
    written = await runner.send(client, planned)
    assert [k for t, k in producer.sent if t == "u.commands"] == [b"down", b"ok"]
    await runner.flush_dead_letters(client)
    assert [t for t, _ in producer.sent if t == "u.deadletter"] == []  # not again
    assert "cmd-too-big" in runner.skip() and "cmd-down" not in runner.skip()


async def test_an_event_that_does_not_decode_or_fold_is_dead_lettered_once() -> None:
    runner, client, producer = _runner()
    garbage = SimpleNamespace(
        topic="u.task.events",
        partition=1,
        offset=5,
        key=None,
        value=b"\xff",
        headers=[("ce_type", None)],
    )
    stored = RecordedEvent(
        id="e-1",
        aggregate_type="task",
        aggregate_id="t-1",
        version=1,
        time=AT,
        correlation_id="c",
        causation_id="c",
        event=tk.TaskQueued(task_id="t-1"),
    )
    record = encode_event("u.task.events", stored)
    folded = SimpleNamespace(
        topic="u.task.events",
        partition=1,
        offset=6,
        key=record.key,
        value=record.value,
        headers=record.headers,
    )

    def explode(_: RecordedEvent) -> None:
        raise KeyError("no such task")

    runner.apply = explode  # type: ignore[method-assign]
    for _ in range(2):  # a second election folds the same log again
        runner.reset()
        assert runner._wanted(garbage) and raw_ce_type(garbage) is None
        runner._fold(garbage)
        runner._fold(folded)
        await runner.flush_dead_letters(client)

    letters = [orjson.loads(v) for v in producer.values["u.deadletter"]]
    assert [(d["offset"], d["reason"].split(":")[0]) for d in letters] == [
        (5, "undecodable event"),
        (6, "cannot fold io.swarmlog.task.queued"),
    ]
    assert all(d["by"] == "/swarmlog/scheduler" for d in letters)

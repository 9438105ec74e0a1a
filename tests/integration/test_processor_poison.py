"""The command processor against a real Kafka, when inputs go wrong: a command whose
decider raises and a command whose event is larger than a record, in the middle of a
stream of good commands, are each rejected with their reason and the partition goes on;
a repeated command id older than what the processor keeps in memory still gets its first
outcome, also after a restart.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete

from commands.client import CommandClient
from commands.idempotency import outcome_subject
from commands.processor import CommandProcessor
from domain import agent as ag
from domain import task as tk
from domain.registry import DECIDERS
from infra.bootstrap import build_processor
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.outcome import Outcome
from infra.stack import StackInfo
from infra.topics import Topics, ensure_topics
from tests.integration.helpers import (
    Running,
    assert_log_is_clean,
    by_aggregate,
    clients,
    end_offsets,
    envelope,
    fresh_prefix,
    fresh_topics,
    now,
    read_events,
    read_records,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 30.0
LIMIT = 256 * 1024  # the record limit these processors enforce (SWARMLOG_RECORD_MAX_BYTES)


async def start(
    bootstrap: str,
    topics: Topics,
    *,
    deciders: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[CommandProcessor, Running]:
    processor = build_processor(clients(bootstrap, topics, **settings), deciders=deciders)
    r = Running(processor, "processor")
    await wait_until(
        lambda: r.check() or len(processor.partitions) == topics.partitions,
        30,
        what="the processor to own every command partition",
    )
    return processor, r


async def _all_decided_and_committed(
    client: CommandClient,
    processor: CommandProcessor,
    stream: list[CommandEnvelope],
    bootstrap: str,
    topics: Topics,
    *,
    outcomes_s: float,
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Wait (``outcomes_s``) for an outcome of every command of ``stream``, then (WAIT)
    for the processor's committed offsets to reach the end of every command partition;
    returns (the end offsets, the committed offsets)."""
    await wait_until(
        lambda: all(client.recent(e.command_id) for e in stream),
        outcomes_s,
        interval=0.2,
        what="an outcome for every command",
    )
    ends = await end_offsets(bootstrap, [topics.commands])
    committed = await wait_until(
        lambda: _caught_up(bootstrap, processor.group_id, ends),
        WAIT,
        what="the committed offsets to reach the end of every command partition",
    )
    return ends, committed


def register(agent_id: str) -> ag.RegisterAgent:
    return ag.RegisterAgent(agent_id=agent_id, name=agent_id, at=now())


def submit(task_id: str, **kw: Any) -> tk.SubmitTask:
    return tk.SubmitTask(task_id=task_id, type="work", at=now(), **kw)


def _recurse(depth: int) -> int:
    return _recurse(depth + 1) + 1


async def committed_offsets(bootstrap: str, group_id: str) -> dict[Any, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
        return {tp: meta.offset for tp, meta in offsets.items()}
    finally:
        await admin.close()


async def send_all(client: CommandClient, envelopes: list[CommandEnvelope]) -> None:
    for i in range(0, len(envelopes), 100):
        await client.send_many(envelopes[i : i + 100])


async def test_a_raising_decider_and_a_too_large_event_amid_1000_commands_end_those_two_alone(
    services: StackInfo,
) -> None:
    real = DECIDERS["agent"]

    def decide(command: Any, state: Any) -> Any:
        # A test-only decider: a heartbeat of a "poison" agent recurses without end.
        if isinstance(command, ag.RecordHeartbeat) and command.agent_id.startswith("poison"):
            _recurse(0)
        return real.decide(command, state)

    # Handed to the processor through the composition root, in the place of the real one.
    deciders = {**DECIDERS, "agent": dataclasses.replace(real, decide=decide)}
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor, r = await start(bootstrap, topics, deciders=deciders, record_max_bytes=LIMIT)
    try:
        good = [
            envelope(register("poison-1")),
            envelope(ag.StartAgent(agent_id="poison-1", at=now())),
        ]
        good += [envelope(register(f"agent-{i}")) for i in range(499)]
        good += [envelope(submit(f"task-{i}")) for i in range(498)]
        good.append(envelope(ag.StopAgent(agent_id="poison-1", at=now())))
        assert len(good) == 1000
        poison = envelope(ag.RecordHeartbeat(agent_id="poison-1", at=now()))
        too_large = envelope(submit("big-task", payload={"blob": "x" * 300_000}))
        stream = good[:500] + [poison, too_large] + good[500:]

        await send_all(client, stream)
        ends, committed = await _all_decided_and_committed(
            client, processor, stream, bootstrap, topics, outcomes_s=60
        )
        r.check()
    finally:
        await r.stop() if not r.task.done() else None
        await client.stop()

    outcomes: dict[str, Outcome] = {e.command_id: client.recent(e.command_id) for e in stream}  # type: ignore[misc]
    assert Counter(outcomes[e.command_id].status for e in good) == {"accepted": 1000}
    failed = outcomes[poison.command_id]
    assert failed.status == "rejected" and failed.rejection is not None
    assert (failed.rejection.kind, failed.rejection.code) == ("invalid", "internal_error")
    assert failed.rejection.detail.startswith("RecursionError: maximum recursion depth exceeded")
    big = outcomes[too_large.command_id]
    assert big.status == "rejected" and big.rejection is not None
    assert (big.rejection.kind, big.rejection.code) == ("invalid", "too_large")
    assert big.rejection.detail.startswith("event task.submitted is 29")
    assert big.rejection.detail.endswith("the record limit is 256 KiB (262,144 bytes)")
    assert processor.internal_errors == 1

    letters = [json.loads(rec.value) for rec in await read_records(bootstrap, topics.deadletter)]
    assert len(letters) == 1, "only the command that raised is dead-lettered"
    assert letters[0]["headers"]["ce_id"] == poison.command_id
    assert letters[0]["reason"].startswith("internal_error: RecursionError")

    events = await read_events(bootstrap, topics)
    assert_log_is_clean(events)
    assert len(events) == 2 + 499 + 498 * 2 + 1
    groups = by_aggregate(events)
    assert ("task", "big-task") not in groups
    assert [e.event.event_type for e in groups[("agent", "poison-1")]] == [
        "registered",
        "started",
        "stopped",
    ]
    assert committed == {tp: ends[tp] for tp in ends}


async def _caught_up(bootstrap: str, group_id: str, ends: dict[Any, int]) -> dict[Any, int] | None:
    committed = await committed_offsets(bootstrap, group_id)
    mine = {tp: committed.get(tp, -1) for tp in ends}
    return mine if mine == ends else None


async def test_a_repeat_older_than_the_outcome_cache_gets_the_first_outcome_also_after_a_restart(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    accepted = envelope(register("dup-agent"))
    refused = envelope(ag.StartAgent(agent_id="ghost", at=now()))
    try:
        processor, r = await start(
            bootstrap, topics, processor_outcome_cache_bytes=1
        )  # caches nothing
        try:
            first = await client.execute(accepted, WAIT)
            first_refusal = await client.execute(refused, WAIT)
            others = await client.execute_many(
                [envelope(submit(f"t-{i}")) for i in range(200)], WAIT
            )
            assert all(o is not None and o.status == "accepted" for o in others)
            await client.execute(envelope(register("ghost")), WAIT)  # StartAgent would pass now
            before = await read_events(bootstrap, topics)

            again = await client.execute(accepted, WAIT)
            again_refusal = await client.execute(refused, WAIT)
            reads_before_restart = processor.reader.reads
            r.check()
        finally:
            await r.stop()

        processor, r = await start(bootstrap, topics, processor_outcome_cache_bytes=1)
        try:
            after_restart = await client.execute(accepted, WAIT)
            refusal_after_restart = await client.execute(refused, WAIT)
            reads_after_restart = processor.reader.reads
            r.check()
        finally:
            await r.stop()

        processor, r = await start(bootstrap, topics)  # the default budget: from memory
        try:
            from_cache = await client.execute(accepted, WAIT)
            reads_with_cache = processor.reader.reads
            r.check()
        finally:
            await r.stop()
        after = await read_events(bootstrap, topics)
    finally:
        await client.stop()

    assert first is not None and first.status == "accepted" and not first.duplicate
    assert first_refusal is not None and first_refusal.rejection is not None
    assert first_refusal.rejection.code == "agent_not_found"
    for repeat in (again, after_restart, from_cache):
        assert repeat is not None and repeat.duplicate
        assert (repeat.status, repeat.version, repeat.events, repeat.decided_at) == (
            first.status,
            first.version,
            first.events,
            first.decided_at,
        )
    for repeat in (again_refusal, refusal_after_restart):
        assert repeat is not None and repeat.duplicate
        assert repeat.rejection == first_refusal.rejection
    assert reads_before_restart == 2 and reads_after_restart == 2, "read back from the topic"
    assert reads_with_cache == 0, "recent outcomes come from memory after a takeover"
    assert sorted(e.id for e in after) == sorted(e.id for e in before), "a repeat writes no event"
    assert len(before) == 1 + 200 * 2 + 1


async def test_an_event_the_broker_refuses_as_too_large_is_rejected_on_the_retry_not_retried_forever(  # noqa: E501
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = Topics(prefix=fresh_prefix(), partitions=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:  # a task topic whose limit is below the processor's: only the broker refuses
        await admin.create_topics(
            [
                NewTopic(
                    topics.events("task"),
                    3,
                    1,
                    topic_configs={"max.message.bytes": "50000", "retention.ms": "-1"},
                )
            ]
        )
    finally:
        await admin.close()
    await ensure_topics(bootstrap, topics)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor, r = await start(bootstrap, topics)
    try:
        processor.retry_backoff_s = 0.1
        big = envelope(submit("big", payload={"blob": "x" * 100_000}))
        small = envelope(submit("small"))
        await client.send_many([big, small])
        await wait_until(
            lambda: client.recent(big.command_id) and client.recent(small.command_id),
            WAIT,
            what="both outcomes",
        )
        r.check()
    finally:
        await r.stop() if not r.task.done() else None
        await client.stop()

    refused, accepted = client.recent(big.command_id), client.recent(small.command_id)
    assert refused is not None and refused.rejection is not None
    assert refused.rejection.code == "too_large" and "refused by Kafka" in refused.rejection.detail
    assert accepted is not None and accepted.status == "accepted"
    events = await read_events(bootstrap, topics)
    assert [e.aggregate_id for e in events] == ["small", "small"]


async def test_ids_whose_outcomes_retention_deleted_are_forgotten_and_the_rest_still_answered(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor, r = await start(bootstrap, topics, processor_outcome_cache_bytes=1)
    old = envelope(register("same-agent"))
    kept = envelope(ag.StartAgent(agent_id="same-agent", at=now()))
    try:
        first_old = await client.execute(old, WAIT)
        first_kept = await client.execute(kept, WAIT)
        positions = {
            outcome_subject(rec): TopicPartition(rec.topic, rec.partition)
            for rec in await read_records(bootstrap, topics.outcomes)
        }
        tp = positions[old.command_id]
        assert positions[kept.command_id] == tp  # same aggregate, same partition
        seen_before = len(processor.partitions[tp.partition].decided)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:  # what retention does to the oldest segment, done at once
            await admin.delete_records({tp: RecordsToDelete(before_offset=1)})
        finally:
            await admin.close()

        await processor._forget_expired()
        seen_after = len(processor.partitions[tp.partition].decided)
        repeat_kept = await client.execute(kept, WAIT)
        repeat_old = await client.execute(old, WAIT)  # outside the idempotency window now
        r.check()
    finally:
        await r.stop() if not r.task.done() else None
        await client.stop()

    assert first_old is not None and first_kept is not None
    assert (seen_before, seen_after) == (2, 1)
    assert repeat_kept is not None and repeat_kept.duplicate
    assert repeat_kept.events == first_kept.events
    assert repeat_old is not None and not repeat_old.duplicate, "decided anew"
    assert repeat_old.rejection is not None
    assert repeat_old.rejection.code == "agent_already_registered"
    assert len(await read_events(bootstrap, topics)) == 2


async def test_a_batch_over_its_decision_budget_commits_what_it_decided_and_reads_the_rest_again(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor, r = await start(bootstrap, topics)
    processor.batch_budget_s = 0.0  # every batch ends after its first command
    try:
        stream = [envelope(register(f"agent-{i}")) for i in range(60)]
        await send_all(client, stream)
        ends, committed = await _all_decided_and_committed(
            client, processor, stream, bootstrap, topics, outcomes_s=WAIT
        )
        r.check()
    finally:
        await r.stop() if not r.task.done() else None
        await client.stop()

    assert all(client.recent(e.command_id).status == "accepted" for e in stream)  # type: ignore[union-attr]
    events = await read_events(bootstrap, topics)
    assert_log_is_clean(events)
    assert len(events) == 60, "each command decided once, none twice"
    assert committed == {tp: ends[tp] for tp in ends}

"""The command processor against a real Kafka: what it writes is what it says it wrote,
each aggregate's events are in order and gapless, a command id is decided once, and a
crash (kill -9) neither loses an accepted command nor duplicates an event.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from commands.client import CommandClient
from commands.processor import CommandProcessor
from domain import agent as ag
from domain import task as tk
from infra.bootstrap import build_processor
from infra.envelope import CommandEnvelope, encode_command
from infra.kafka import Kafka
from infra.mapper import ce_type_of, decode_event
from infra.outcome import Outcome
from infra.stack import StackInfo
from infra.topics import Topics
from tests.integration.helpers import (
    RoleProcess,
    Running,
    assert_log_is_clean,
    by_aggregate,
    clients,
    envelope,
    fresh_topics,
    now,
    read_at,
    read_events,
    read_outcomes,
    read_records,
    role_env,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 20.0


@dataclass
class Harness:
    bootstrap: str
    topics: Topics
    client: CommandClient
    processor: Running

    async def execute(self, env: CommandEnvelope) -> Outcome:
        outcome = await self.client.execute(env, WAIT)
        assert outcome is not None, f"no outcome for {env.command!r} within {WAIT} s"
        return outcome

    async def events(self) -> list:  # type: ignore[type-arg]
        return await read_events(self.bootstrap, self.topics)


async def start_processor(bootstrap: str, topics: Topics) -> tuple[CommandProcessor, Running]:
    processor = build_processor(clients(bootstrap, topics))
    r = Running(processor, "processor")
    await wait_until(
        lambda: r.check() or len(processor.partitions) == topics.partitions,
        30,
        what="the processor to own every command partition",
    )
    return processor, r


@pytest.fixture
async def h(services: StackInfo) -> AsyncIterator[Harness]:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    try:
        _, r = await start_processor(bootstrap, topics)
        try:
            yield Harness(bootstrap, topics, client, r)
            r.check()
        finally:
            if not r.task.done():
                await r.stop()
    finally:
        await client.stop()


def register(agent_id: str, **kw: object) -> ag.RegisterAgent:
    return ag.RegisterAgent(agent_id=agent_id, name=agent_id, at=now(), **kw)  # type: ignore[arg-type]


def submit(task_id: str) -> tk.SubmitTask:
    return tk.SubmitTask(task_id=task_id, type="work", at=now())


# ---------------------------------------------------------------------------------------


async def test_an_accepted_outcome_points_at_events_really_on_the_event_topic(h: Harness) -> None:
    registered = await h.execute(envelope(register("a1")))
    submitted = await h.execute(envelope(submit("t1")))

    assert (registered.status, registered.version, registered.duplicate) == ("accepted", 1, False)
    assert (submitted.status, submitted.version) == ("accepted", 2)
    described = registered.events + submitted.events
    assert [e.type for e in described] == [
        "io.swarmlog.agent.registered",
        "io.swarmlog.task.submitted",
        "io.swarmlog.task.queued",
    ]
    for e in described:
        stored = decode_event(await read_at(h.bootstrap, e.topic, e.partition, e.offset))
        assert (stored.id, stored.version, ce_type_of(stored)) == (e.id, e.version, e.type)
    assert registered.state is not None and registered.state["lifecycle"] == "registered"


async def test_each_aggregates_events_are_gapless_and_in_command_order(h: Harness) -> None:
    hot = "hot-agent"
    sequences: list[list[CommandEnvelope]] = [
        [envelope(register(hot)), envelope(ag.StartAgent(agent_id=hot, at=now()))]
        + [envelope(ag.RecordHeartbeat(agent_id=hot, at=now())) for _ in range(98)]
    ]
    sequences += [
        [envelope(register(f"cold-{i}")), envelope(ag.StartAgent(agent_id=f"cold-{i}", at=now()))]
        for i in range(20)
    ]
    sequences += [[envelope(submit(f"task-{i}"))] for i in range(30)]
    interleaved = [
        seq[i] for i in range(max(map(len, sequences))) for seq in sequences if i < len(seq)
    ]

    outcomes = await h.client.execute_many(interleaved, WAIT)

    assert all(o is not None for o in outcomes), "some commands got no outcome"
    assert Counter(o.status for o in outcomes if o) == {"accepted": len(interleaved)}
    events = await h.events()
    assert_log_is_clean(events)
    hot_events = by_aggregate(events)[("agent", hot)]
    assert [e.version for e in hot_events] == list(range(1, 101))
    assert [e.causation_id for e in hot_events] == [env.command_id for env in sequences[0]]
    assert [e.event.event_type for e in hot_events[:3]] == [
        "registered",
        "started",
        "heartbeat_recorded",
    ]
    assert len(events) == 100 + 40 + 60


async def test_a_repeated_command_id_returns_the_first_outcome_and_writes_nothing(
    h: Harness,
) -> None:
    env = envelope(register("a1"))
    first = await h.execute(env)
    before = await h.events()

    again = await h.execute(env)

    assert again.duplicate is True and first.duplicate is False
    assert (again.status, again.version, again.events) == (
        first.status,
        first.version,
        first.events,
    )
    assert again.command_id == first.command_id
    assert await h.events() == before and len(before) == 1


async def test_a_repeated_rejected_command_id_repeats_the_rejection(h: Harness) -> None:
    env = envelope(ag.StartAgent(agent_id="ghost", at=now()))
    first = await h.execute(env)
    await h.execute(envelope(register("ghost")))

    again = await h.execute(env)  # would be accepted now, were it decided again

    assert (
        first.status == "rejected" and first.rejection and first.rejection.code == "agent_not_found"
    )
    assert (again.status, again.duplicate, again.rejection) == ("rejected", True, first.rejection)


async def test_a_command_id_repeated_in_the_same_batch_gets_the_first_outcome_with_positions(
    h: Harness,
) -> None:
    env = envelope(submit("t-twice"))

    await h.client.send_many([env, env])  # one producer batch: most likely one poll
    await wait_until(
        lambda: (
            h.client.recent(env.command_id) is not None
            and h.client.recent(env.command_id).duplicate
        ),  # type: ignore[union-attr]
        WAIT,
        what="the duplicate outcome",
    )

    outcomes = [
        o for o in await read_outcomes(h.bootstrap, h.topics) if o.command_id == env.command_id
    ]
    assert [o.duplicate for o in outcomes] == [False, True]
    first, dup = outcomes
    assert dup.events == first.events, "the repeat must carry the first outcome's positions"
    assert all(e.offset is not None and e.partition is not None for e in first.events)
    assert len(await h.events()) == 2


async def test_a_stale_expected_version_is_rejected_as_a_precondition_and_writes_nothing(
    h: Harness,
) -> None:
    await h.execute(envelope(register("a1"), expected_version=0))

    stale = await h.execute(envelope(ag.StartAgent(agent_id="a1", at=now()), expected_version=3))
    after_stale = await h.events()
    fresh = await h.execute(envelope(ag.StartAgent(agent_id="a1", at=now()), expected_version=1))

    assert stale.status == "rejected" and stale.rejection is not None
    assert (stale.rejection.kind, stale.rejection.code, stale.version) == (
        "precondition",
        "version_mismatch",
        1,
    )
    assert stale.events == []
    assert len(after_stale) == 1
    assert (fresh.status, fresh.version) == ("accepted", 2)


async def test_a_rejected_command_writes_no_event(h: Harness) -> None:
    unknown = await h.execute(envelope(ag.StartAgent(agent_id="nobody", at=now())))
    not_found = await h.execute(
        envelope(tk.CompleteTask(task_id="no-task", agent_id="a", at=now()))
    )
    await h.execute(envelope(register("a1")))
    conflict = await h.execute(envelope(register("a1")))

    assert [o.status for o in (unknown, not_found, conflict)] == ["rejected"] * 3
    assert [o.rejection.kind for o in (unknown, not_found, conflict)] == [  # type: ignore[union-attr]
        "not_found",
        "not_found",
        "conflict",
    ]
    assert (unknown.version, conflict.version) == (0, 1)
    events = await h.events()
    assert [(e.aggregate_id, e.version) for e in events] == [("a1", 1)]


async def test_a_malformed_command_record_is_dead_lettered_and_the_next_command_is_decided(
    h: Harness,
) -> None:
    raw = AIOKafkaProducer(bootstrap_servers=h.bootstrap, enable_idempotence=True, acks="all")
    await raw.start()
    try:
        # Same key as the next command: same partition, so it must get past the bad ones.
        await raw.send_and_wait(h.topics.commands, b"{not json", key=b"a1")
        await raw.send_and_wait(
            h.topics.commands,
            b"{}",
            key=b"a1",
            headers=[
                ("ce_specversion", b"1.0"),
                ("ce_id", b"bad-type"),
                ("ce_source", b"/tests"),
                ("ce_type", b"io.swarmlog.command.agent.LaunchRockets"),
                ("content-type", b"application/json"),
            ],
        )
    finally:
        await raw.stop()

    after = await h.execute(envelope(register("a1")))

    assert after.status == "accepted"
    letters = await wait_until(lambda: _dead_letters(h), WAIT, what="two dead letters")
    assert len(letters) == 2
    assert {d["topic"] for d in letters} == {h.topics.commands}
    assert "not a CloudEvent" in letters[0]["reason"]
    assert "LaunchRockets" in letters[1]["reason"]
    assert letters[0]["value"] == "{not json" and letters[0]["key"] == "a1"
    assert letters[1]["offset"] == letters[0]["offset"] + 1
    refused = await wait_until(lambda: h.client.recent("bad-type"), WAIT, what="its outcome")
    assert refused.rejection is not None and refused.rejection.code == "malformed_command"
    assert "LaunchRockets" in refused.rejection.detail
    h.processor.check()


async def test_an_unreadable_command_that_names_its_id_gets_a_rejected_outcome_and_a_dead_letter(
    h: Harness,
) -> None:
    bad = envelope(register("a1"))
    record = encode_command(h.topics.commands, bad)
    headers = [(k, v) for k, v in record.headers if k != "ce_expectedversion"]
    raw = AIOKafkaProducer(bootstrap_servers=h.bootstrap, enable_idempotence=True, acks="all")
    await raw.start()
    try:
        await raw.send_and_wait(
            record.topic,
            record.value,
            key=record.key,
            headers=[("ce_expectedversion", b"abc"), *headers],
        )
    finally:
        await raw.stop()

    refused = await wait_until(lambda: h.client.recent(bad.command_id), WAIT, what="its outcome")
    after = await h.execute(envelope(register("a1")))

    assert refused.status == "rejected" and refused.rejection is not None
    assert refused.rejection.kind == "invalid" and "abc" in refused.rejection.detail
    assert refused.rejection.code in ("malformed_command", "internal_error")
    assert (refused.command_type, refused.aggregate_type, refused.aggregate_id) == (
        "RegisterAgent",
        "agent",
        "a1",
    )
    assert (after.status, after.version) == ("accepted", 1)
    letters = [json.loads(r.value) for r in await read_records(h.bootstrap, h.topics.deadletter)]
    assert [d["headers"]["ce_id"] for d in letters] == [bad.command_id]
    assert "abc" in letters[0]["reason"]
    h.processor.check()


async def _dead_letters(h: Harness) -> list[dict]:  # type: ignore[type-arg]
    records = await read_records(h.bootstrap, h.topics.deadletter)
    return (
        sorted((json.loads(r.value) for r in records), key=lambda d: d["offset"])
        if len(records) >= 2
        else []
    )


async def test_a_restarted_processor_rebuilds_state_and_still_knows_old_command_ids(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    try:
        start = envelope(ag.StartAgent(agent_id="a1", at=now()))
        _, first = await start_processor(bootstrap, topics)
        try:
            for env in (
                envelope(register("a1")),
                start,
                envelope(submit("t1")),
                envelope(tk.AssignTask(task_id="t1", agent_id="a1", at=now())),
            ):
                out = await client.execute(env, WAIT)
                assert out is not None and out.status == "accepted"
            started_first = client.recent(start.command_id)
        finally:
            await first.stop()

        _, second = await start_processor(bootstrap, topics)
        try:
            again = await client.execute(envelope(ag.StartAgent(agent_id="a1", at=now())), WAIT)
            repeat = await client.execute(start, WAIT)
            wrong_agent = await client.execute(
                envelope(tk.StartTask(task_id="t1", agent_id="a2", at=now())), WAIT
            )
            stop = await client.execute(envelope(ag.StopAgent(agent_id="a1", at=now())), WAIT)
            run = await client.execute(
                envelope(tk.StartTask(task_id="t1", agent_id="a1", at=now())), WAIT
            )
            second.check()
        finally:
            await second.stop()
    finally:
        await client.stop()

    assert again and again.rejection and again.rejection.code == "agent_already_running"
    assert repeat and repeat.duplicate and started_first
    assert repeat.events == started_first.events and repeat.status == "accepted"
    assert (
        wrong_agent and wrong_agent.rejection and wrong_agent.rejection.code == "not_assigned_agent"
    )
    assert stop and (stop.status, stop.version) == ("accepted", 3)
    assert run and (run.status, run.version) == ("accepted", 4)
    events = await read_events(bootstrap, topics)
    assert_log_is_clean(events)
    assert len(events) == 7


# the fault test ------------------------------------------------------------------------


def _mixed_commands(n_agents: int, n_tasks: int) -> list[CommandEnvelope]:
    """RegisterAgent/StartAgent/RecordHeartbeat per agent (in that order) and SubmitTask,
    interleaved; every command has its own id."""
    sequences: list[list[CommandEnvelope]] = []
    run = uuid.uuid4().hex[:6]
    for i in range(n_agents):
        aid = f"agent-{run}-{i}"
        sequences.append(
            [
                envelope(register(aid)),
                envelope(ag.StartAgent(agent_id=aid, at=now())),
                envelope(ag.RecordHeartbeat(agent_id=aid, at=now())),
                envelope(ag.RecordHeartbeat(agent_id=aid, at=now())),
            ]
        )
    tasks = [envelope(submit(f"task-{run}-{i}")) for i in range(n_tasks)]
    out: list[CommandEnvelope] = []
    for round_ in range(4):
        for i, seq in enumerate(sequences):
            out.append(seq[round_])
            if round_ * len(sequences) + i < len(tasks):
                out.append(tasks[round_ * len(sequences) + i])
    return out


async def test_kill_9_of_the_processor_loses_no_accepted_command_and_duplicates_no_event(
    services: StackInfo, tmp_path: Path
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    env = role_env(services, topics.prefix)
    commands = _mixed_commands(n_agents=250, n_tasks=1000)
    assert len(commands) == 2000
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    first = RoleProcess("processor", env, tmp_path / "processor-1.log")
    second: RoleProcess | None = None
    try:
        probe = await client.execute(envelope(register(f"probe-{topics.prefix}")), 60)
        assert probe is not None, f"processor not answering:\n{first.output()}"

        def seen() -> int:
            return sum(client.recent(c.command_id) is not None for c in commands)

        seen_at_kill = None
        for i in range(0, len(commands), 40):
            await client.send_many(commands[i : i + 40])
            await asyncio.sleep(0.03)
            if seen_at_kill is None and seen() >= 500:
                first.kill9()
                seen_at_kill = seen()
        if seen_at_kill is None:  # it was slower than the sender: kill it mid-backlog
            await wait_until(lambda: seen() >= 500, 30, what="500 outcomes")
            first.kill9()
            seen_at_kill = seen()
        assert seen_at_kill < len(commands), "killed after everything was decided"

        second = RoleProcess("processor", env, tmp_path / "processor-2.log")
        # What a client does: send again, same ids, whatever it has no outcome for.
        unanswered = [c for c in commands if client.recent(c.command_id) is None]
        await client.send_many(unanswered)
        await wait_until(
            lambda: seen() == len(commands), 50, interval=0.2, what="an outcome for every command"
        )
        assert second.alive(), second.output()
    finally:
        first.kill9()
        if second is not None:
            second.terminate()
        await client.stop()

    outcomes = {c.command_id: client.recent(c.command_id) for c in commands}
    assert Counter(o.status for o in outcomes.values() if o) == {"accepted": len(commands)}
    events = [
        e for e in await read_events(bootstrap, topics) if not e.aggregate_id.startswith("probe")
    ]
    assert_log_is_clean(events)
    on_log = Counter(e.id for e in events)
    promised = [e.id for o in outcomes.values() if o for e in o.events]
    assert len(promised) == len(set(promised)) == len(events)
    assert all(on_log[i] == 1 for i in promised)
    decided = Counter(
        o.command_id for o in await read_outcomes(bootstrap, topics) if not o.duplicate
    )
    assert all(decided[c.command_id] == 1 for c in commands), "a command was decided twice"
    assert len(unanswered) > 0
    print(f"killed after {seen_at_kill} outcomes; resent {len(unanswered)}")


async def test_a_second_processor_joining_mid_stream_shares_the_work_and_nothing_is_decided_twice(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    commands = _mixed_commands(n_agents=100, n_tasks=400)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    first_p, first = await start_processor(bootstrap, topics)
    second: Running | None = None
    second_p: CommandProcessor | None = None
    try:
        half = len(commands) // 2
        for i in range(0, half, 40):
            await client.send_many(commands[i : min(i + 40, half)])
            await asyncio.sleep(0.02)
            if second is None and i >= 200:  # joins while commands are in flight
                second_p = build_processor(clients(bootstrap, topics))
                second = Running(second_p, "processor-2")
        assert second is not None and second_p is not None
        await wait_until(lambda: second_p.partitions, 20, what="the second copy to own a partition")
        # The second half depends on the first (StartAgent after RegisterAgent ...), now
        # partly decided by a copy that rebuilt that state from the log.
        for i in range(half, len(commands), 40):
            await client.send_many(commands[i : i + 40])
        await wait_until(
            lambda: all(client.recent(c.command_id) for c in commands),
            40,
            interval=0.2,
            what="an outcome for every command",
        )
        assert first_p.processed > 0 and second_p.processed > 0
        first.check()
        second.check()
        shared = (set(first_p.partitions), set(second_p.partitions))
    finally:
        await first.stop() if not first.task.done() else None
        if second is not None and not second.task.done():
            await second.stop()
        await client.stop()

    assert shared[0] and shared[1] and not shared[0] & shared[1], shared
    outcomes = [client.recent(c.command_id) for c in commands]
    assert Counter(o.status for o in outcomes if o) == {"accepted": len(commands)}
    events = await read_events(bootstrap, topics)
    assert_log_is_clean(events)
    assert len(events) == 400 + 400 * 2
    decided = Counter(
        o.command_id for o in await read_outcomes(bootstrap, topics) if not o.duplicate
    )
    assert set(decided.values()) == {1} and len(decided) == len(commands)

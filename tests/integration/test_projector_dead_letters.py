"""No record stops the projector, and no outage skips one (swarmlog issue 8).

Events that the read models' PostgreSQL tables refuse (a NUL in a text column or in a
JSON payload, a number out of a column's range) are written straight to the task event
topic, past the API and the deciders, as another producer could. They are dead-lettered
with the reason, listed, the stored offset passes them and the events after them are
projected at once. Killing the projector's PostgreSQL connections mid-stream costs a
retry, never a dead letter. A dead-lettered event is replayed after a fix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import AIOKafkaProducer, TopicPartition

from domain import task as tk
from domain.ids import derived_id
from domain.recorded import RecordedEvent
from infra.mapper import encode_event
from projections.readmodels import READ_MODELS, Applied
from projections.readmodels.tasks import Tasks
from tests.integration import test_projector
from tests.integration.helpers import (
    ROOT,
    Running,
    envelope,
    now,
    read_records,
    role_env,
    wait_until,
)
from tests.integration.test_projector import (
    World,
    _interleave,
    agent_commands,
    assert_read_models_match_the_log,
    assert_redis_matches_the_rows,
    new_agents,
    task_commands,
    workload,
)

pytestmark = pytest.mark.integration

world = test_projector.world  # the fixture: fresh topics, schema, a running processor


def submitted(task_id: str, **spec: Any) -> RecordedEvent:
    """A task's first event, as the processor would have written it (version 1)."""
    fields: dict[str, Any] = {
        "task_id": task_id,
        "type": "job",
        "payload": {},
        "required_capabilities": (),
        "priority": "normal",
        "max_cost": None,
        "lease_timeout_s": 30.0,
        "run_timeout_s": 600.0,
        "max_attempts": 3,
    }
    fields.update(spec)
    return RecordedEvent(
        id=derived_id("test-event", task_id, 1),
        aggregate_type=tk.TASK,
        aggregate_id=task_id,
        version=1,
        time=now(),
        correlation_id=task_id,
        causation_id=task_id,
        event=tk.TaskSubmitted(**fields),
    )


def cancelled(task_id: str, version: int) -> RecordedEvent:
    return RecordedEvent(
        id=derived_id("test-event", task_id, version),
        aggregate_type=tk.TASK,
        aggregate_id=task_id,
        version=version,
        time=now(),
        correlation_id=task_id,
        causation_id=task_id,
        event=tk.TaskCancelled(task_id=task_id, reason="given up"),
    )


async def write_events(w: World, events: list[RecordedEvent]) -> list[tuple[str, int, int]]:
    """Produce ``events`` straight to the task topic (keyed by task id, as the processor
    keys them); returns each one's (topic, partition, offset)."""
    raw = AIOKafkaProducer(bootstrap_servers=w.bootstrap, enable_idempotence=True)
    await raw.start()
    try:
        out = []
        for e in events:
            record = encode_event(w.topics.events(tk.TASK), e)
            meta = await raw.send_and_wait(
                record.topic, record.value, key=record.key, headers=record.headers
            )
            out.append((meta.topic, meta.partition, meta.offset))
        return out
    finally:
        await raw.stop()


async def dead_letters(w: World) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in await read_records(w.bootstrap, w.topics.deadletter)]


async def cli(w: World, *args: str) -> tuple[int, str, str]:
    """Run ``swarmlog <args>`` on this test's topics and schema: (exit code, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "infra.cli",
        *args,
        cwd=ROOT,
        env=role_env(w.services, w.topics.prefix, COLUMNS="200"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_events_postgresql_refuses_are_dead_lettered_and_the_events_after_them_projected(
    world: World,
) -> None:
    run = uuid.uuid4().hex[:6]
    bad = [
        submitted(f"nul-type-{run}", type="a\x00b"),
        submitted(f"nul-payload-{run}", payload={"note": "x\x00y", "nested": ["\x00"]}),
        # Beyond 64 bits: written as JSON, but read back as a float (the decoder refuses it)
        submitted(f"too-big-{run}", max_cost=10**20),
        submitted(f"too-many-{run}", max_attempts=2**31),  # the integer column refuses it
    ]
    good_before = submitted(f"fine-before-{run}", payload={"n": 1})
    projector = Running(await world.projector(), "projector")
    try:
        await world.run_all([envelope(tk.SubmitTask(task_id="warm", type="job", at=now()))])
        await world.caught_up()  # the projector is up
        # Bad and good events in one batch: the good ones must not be held back by it.
        positions = await write_events(world, [good_before, *bad])
        bad_positions = set(positions[1:])
        good_id = f"fine-after-{run}"
        await world.run_all([envelope(tk.SubmitTask(task_id=good_id, type="job", at=now()))])
        accepted = time.monotonic()

        async def projected(task_id: str) -> bool:
            return (
                await world.pool.fetchval(
                    f"SELECT count(*) FROM {world.schema}.tasks WHERE task_id = $1", task_id
                )
                == 1
            )

        await wait_until(lambda: projected(good_id), 10, interval=0.02, what="the good task's row")
        took = time.monotonic() - accepted
        assert took < 1.0, f"the good task's row took {took:.2f} s"
        assert await projected(good_before.aggregate_id)
        await world.caught_up()
        projector.check()  # still alive

        letters = await wait_until(
            lambda: _dead_letters_of(world, bad_positions), 10, what="the dead letters"
        )
        # Listed: projected from the dead-letter topic into the table, with the reasons.
        listed = await wait_until(
            lambda: _listed(world, len(bad)), 10, what="the dead letters in the table"
        )
    finally:
        await projector.stop()

    reasons = {(d["topic"], d["partition"], d["offset"]): d["reason"] for d in letters}
    assert set(reasons) == bad_positions
    for e, p in zip(bad, positions[1:], strict=True):
        assert e.aggregate_id in reasons[p] or "max_cost" in reasons[p], reasons[p]
    # A NUL is refused in jsonb (the event archive, the payload) and in text (the type).
    for p in positions[1:3]:
        assert "UntranslatableCharacter" in reasons[p] or "CharacterNotInRepertoire" in reasons[p]
    assert "int32 range" in reasons[positions[4]]
    # The dead letter keeps the record, so it can be replayed or inspected.
    nul = next(d for d in letters if d["offset"] == positions[1][2])
    assert nul["key"] == bad[0].aggregate_id and "a\\u0000b" in nul["value"]

    assert {(r["source_topic"], r["source_partition"], r["source_offset"]) for r in listed} == (
        bad_positions
    )
    assert all(
        r["reason"]
        == reasons[(r["source_topic"], r["source_partition"], r["source_offset"])].replace(
            "\x00", "\\u0000"
        )
        for r in listed
    )
    stored = await world.stored_offsets()
    for topic, partition, offset in bad_positions:
        assert stored[TopicPartition(topic, partition)] > offset
    tasks = await world.rows("tasks", "task_id")
    assert not {e.aggregate_id for e in bad} & tasks.keys()

    code, out, err = await cli(world, "deadletters", "--json", "--limit", "10")
    assert code == 0, err
    shown = json.loads(out)
    assert [r["dead_lettered_at"] for r in shown] == sorted(
        (r["dead_lettered_at"] for r in shown), reverse=True
    )
    assert {r["source_offset"] for r in shown} == {p[2] for p in bad_positions}
    code, out, err = await cli(world, "deadletters", "--limit", "2", "--json", "--from-log")
    assert code == 0, err
    assert len(json.loads(out)) == 2
    code, out, err = await cli(
        world, "deadletters", "--topic", world.topics.events("agent"), "--json"
    )
    assert code == 0 and json.loads(out) == []
    code, _, err = await cli(world, "deadletters")
    assert code == 0 and "int32 range" in err and bad[3].aggregate_id in err, err


async def _dead_letters_of(w: World, wanted: set[tuple[str, int, int]]) -> list[dict[str, Any]]:
    letters = await dead_letters(w)
    got = {(d["topic"], d["partition"], d["offset"]) for d in letters}
    return letters if got >= wanted else []


async def _listed(w: World, n: int) -> list[dict[str, Any]]:
    try:
        rows = await w.pool.fetch(f"SELECT * FROM {w.schema}.dead_letters")
    except asyncpg.UndefinedTableError:
        return []
    return [dict(r) for r in rows] if len(rows) >= n else []


async def test_an_event_whose_view_raises_is_dead_lettered(world: World) -> None:
    # A bug in a read model (its apply raising on one event) is that event's dead letter,
    # not a stopped projector. The buggy read model is handed in through the composition
    # root, in the place of the tasks read model.
    class BuggyTasks(Tasks):
        async def apply(self, conn: Any, events: Sequence[RecordedEvent]) -> Applied:
            for stored in events:
                if isinstance(stored.event, tk.TaskSubmitted) and stored.event.type == "poison":
                    raise OverflowError("the view cannot take this one")
            return await super().apply(conn, events)

    models = tuple(BuggyTasks if model is Tasks else model for model in READ_MODELS)
    projector = Running(await world.projector(read_models=models), "projector")
    try:
        await world.run_all(
            [
                envelope(tk.SubmitTask(task_id="p", type="poison", at=now())),
                envelope(tk.SubmitTask(task_id="q", type="job", at=now())),
            ]
        )
        await world.caught_up()
        projector.check()
        letters = await wait_until(lambda: dead_letters(world), 10, what="a dead letter")
    finally:
        await projector.stop()
    assert [d["key"] for d in letters] == ["p"]
    assert "OverflowError: the view cannot take this one" in letters[0]["reason"]
    assert set((await world.rows("tasks", "task_id")).keys()) == {"q"}


async def test_killed_postgresql_connections_are_retried_and_nothing_is_dead_lettered(
    world: World,
) -> None:
    agents = new_agents(6)
    projector = await world.projector(batch_size=20)
    running = Running(projector, "projector")
    name = f"swarmlog-projector-{world.schema}"
    killed = 0

    async def kill_connections() -> None:
        # The projector's connections, over and over: in the middle of transactions, and
        # idle in the pool.
        nonlocal killed
        while True:
            killed += await world.pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1",
                name,
            )
            await asyncio.sleep(0.1)

    try:
        await world.run_phases(workload(agents, n_tasks=6))
        killer = asyncio.create_task(kill_connections())
        try:
            for _ in range(4):
                await world.run_all(
                    _interleave(
                        agent_commands(agents, 3, register=False) + task_commands(agents, 30)
                    )
                )
                await asyncio.sleep(0.5)
        finally:
            killer.cancel()
        assert killed >= 3, f"only {killed} connections terminated"
        await world.caught_up(timeout=60)
        running.check()
        await assert_read_models_match_the_log(world)
        # Later events are projected as usual.
        await world.run_all([envelope(tk.SubmitTask(task_id="after", type="job", at=now()))])
        await world.caught_up()
        running.check()
    finally:
        await running.stop()
    assert projector.retries > 0, "no batch met a killed connection"
    assert "after" in await world.rows("tasks", "task_id")
    assert await dead_letters(world) == []


async def test_a_dead_lettered_event_is_replayed_after_a_fix(world: World) -> None:
    run = uuid.uuid4().hex[:6]
    task_id = f"costly-{run}"
    projector = Running(await world.projector(), "projector")
    try:
        # max_attempts beyond the integer column; its cancellation (version 2) is
        # ignored by the views while the task has no row.
        (position, _) = await write_events(
            world, [submitted(task_id, max_attempts=2**31), cancelled(task_id, 2)]
        )
        await world.caught_up()
        await wait_until(lambda: _listed(world, 1), 10, what="the dead letter in the table")
        assert task_id not in await world.rows("tasks", "task_id")
        ref = f"{position[0]}:{position[1]}:{position[2]}"

        code, _, err = await cli(world, "deadletters", "replay", ref)
        assert code == 1 and "still refused" in err and "int32" in err, err

        # The fix: the column takes the value now.
        await world.pool.execute(
            f"ALTER TABLE {world.schema}.tasks ALTER COLUMN max_attempts TYPE bigint"
        )
        letter_id = (await _listed(world, 1))[0]["id"]
        code, out, err = await cli(world, "deadletters", "replay", letter_id)
        assert code == 0, err
        assert "1 later event(s) of it applied" in out, out
        projector.check()
    finally:
        await projector.stop()
    row = (await world.rows("tasks", "task_id"))[task_id]
    assert (row["max_attempts"], row["status"], row["version"]) == (2**31, "cancelled", 2)
    archived = await world.pool.fetchval(
        f"SELECT count(*) FROM {world.schema}.events WHERE aggregate_id = $1", task_id
    )
    assert archived == 2
    listed = await _listed(world, 1)
    assert listed[0]["replayed_at"] is not None and "applied" in listed[0]["replay_note"]
    # Once only: nothing was written to the event store again.
    assert len(await read_records(world.bootstrap, world.topics.events(tk.TASK))) == 2


async def test_redis_down_holds_back_only_the_redis_views(world: World, tmp_path: Path) -> None:
    # Redis is written after each commit: while it is down the PostgreSQL read models go
    # on, and the agents it missed are copied to it once it answers.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    projector = await world.projector(REDIS_URL=url)
    running = Running(projector, "projector")
    red = aioredis.from_url(url)
    server: asyncio.subprocess.Process | None = None

    async def answers() -> bool:
        try:
            return bool(await red.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        await world.run_phases(workload(new_agents(4), n_tasks=8))  # caught up each phase
        running.check()
        assert projector.retries == 0
        server = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_until(answers, 10, what="the new Redis")
        await assert_redis_matches_the_rows(dataclasses.replace(world, redis=red), 20.0)
        running.check()
    finally:
        await running.stop()
        await red.aclose()
        if server is not None:
            server.terminate()  # by its pid: the Redis this test started
            await asyncio.wait_for(server.wait(), 10)
    assert await dead_letters(world) == []


async def test_a_dead_lettered_command_is_replayed_by_producing_it_again(world: World) -> None:
    # A command the processor could not read: replay puts the same record (key, value,
    # headers) on the command topic again, for the processor to read again.
    raw = AIOKafkaProducer(bootstrap_servers=world.bootstrap, enable_idempotence=True)
    await raw.start()
    try:
        meta = await raw.send_and_wait(
            world.topics.commands,
            b"not a command",
            key=b"k-1",
            headers=[("x-test", b"1"), ("ce_id", b"cmd-1")],
        )
    finally:
        await raw.stop()
    projector = Running(await world.projector(), "projector")
    try:
        await wait_until(lambda: _listed(world, 1), 30, what="the command's dead letter listed")
        code, out, err = await cli(
            world, "deadletters", "replay", f"{meta.topic}:{meta.partition}:{meta.offset}"
        )
        assert code == 0, err
        replay_id = derived_id("replay", "cmd-1")
        assert (
            f"produced the record (read from its topic) to {meta.topic} again"
            f" as command {replay_id}" in out
        ), out
        # The processor reads it again, and refuses it again: a second dead letter.
        rows = await wait_until(lambda: _listed(world, 2), 30, what="a second dead letter")
        projector.check()
    finally:
        await projector.stop()
    copies = [
        r for r in await read_records(world.bootstrap, world.topics.commands) if r.key == b"k-1"
    ]
    assert [(r.value, list(r.headers)) for r in copies] == [
        (b"not a command", [("x-test", b"1"), ("ce_id", b"cmd-1")]),
        (
            b"not a command",
            [
                ("x-test", b"1"),
                ("ce_id", replay_id.encode()),
                ("ce_causationid", b"cmd-1"),
            ],
        ),
    ]
    assert copies[1].offset > copies[0].offset
    first = next(r for r in rows if r["source_offset"] == meta.offset)
    assert first["replayed_at"] is not None
    assert {r["source_offset"] for r in rows} == {copies[0].offset, copies[1].offset}

"""The projector against real Kafka, PostgreSQL and Redis: the read models are what a fold
of the log says they are, the archive holds every event once, and a kill -9 mid-stream
neither skips nor double-applies anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from domain.recorded import RecordedEvent
from infra.bootstrap import build_processor, open_projector
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.mapper import ce_type_of
from infra.stack import StackInfo
from infra.topics import Topics
from projections import views
from projections.keys import RedisKeys
from projections.offsets import PROJECTION
from projections.projector import Projector
from projections.readmodels.base import ReadModel
from tests.integration.helpers import (
    RoleProcess,
    Running,
    clients,
    end_offsets,
    envelope,
    fresh_topics,
    now,
    read_events,
    read_records,
    role_env,
    wait_until,
)

pytestmark = pytest.mark.integration

JSON_COLUMNS = {"capabilities", "payload", "required_capabilities", "result"}


@dataclass
class World:
    services: StackInfo
    topics: Topics
    client: CommandClient
    pool: asyncpg.Pool
    redis: aioredis.Redis
    #: Closes what the projectors of this test opened (their pools and Redis clients).
    parts: contextlib.AsyncExitStack

    @property
    def bootstrap(self) -> str:
        return self.services.kafka_bootstrap_servers

    @property
    def schema(self) -> str:
        return self.topics.prefix

    async def projector(
        self,
        batch_size: int = 500,
        *,
        read_models: Sequence[type[ReadModel]] | None = None,
        **settings: Any,
    ) -> Projector:
        """A projector built by the composition root, with its own pool and Redis client
        (closed at the end of the test); ``settings`` as Settings field names;
        ``read_models`` instead of the deployed ones."""
        built = clients(
            self.bootstrap,
            self.topics,
            services=self.services,
            projector_batch_size=batch_size,
            **settings,
        )
        return await self.parts.enter_async_context(open_projector(built, read_models=read_models))

    async def run_all(self, envelopes: list[CommandEnvelope], wait_s: float = 30.0) -> None:
        """Send ``envelopes`` and wait until every one is accepted."""
        outcomes = await self.client.execute_many(envelopes, wait_s)
        missing = sum(o is None for o in outcomes)
        assert missing == 0, f"{missing} commands got no outcome"
        rejected = [o for o in outcomes if o and o.status != "accepted"]
        assert not rejected, f"{len(rejected)} rejected, e.g. {rejected[0].rejection}"

    async def run_phases(
        self, phases: list[list[CommandEnvelope]], *, projected: bool = True
    ) -> None:
        """``run_all`` each phase in turn; with ``projected``, wait for the projector to
        catch up after each one (so agents are projected before their tasks)."""
        for phase in phases:
            await self.run_all(phase)
            if projected:
                await self.caught_up()

    async def stored_offsets(self) -> dict[TopicPartition, int]:
        try:
            rows = await self.pool.fetch(
                f"SELECT topic, partition, next_offset FROM {self.schema}.projection_offsets"
                " WHERE projection = $1",
                PROJECTION,
            )
        except asyncpg.UndefinedTableError:
            return {}
        return {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def last_offsets(self) -> dict[TopicPartition, int]:
        """1 + the offset of the last record of every non-empty event-topic partition."""
        out: dict[TopicPartition, int] = {}
        for topic in self.topics.event_topics.values():
            for r in await read_records(self.bootstrap, topic):
                tp = TopicPartition(r.topic, r.partition)
                out[tp] = max(out.get(tp, 0), r.offset + 1)
        return out

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the stored offsets are past the last record of every partition."""
        wanted = await self.last_offsets()

        async def done() -> bool:
            stored = await self.stored_offsets()
            return all(stored.get(tp, 0) >= n for tp, n in wanted.items())

        await wait_until(done, timeout, interval=0.1, what="the projector to catch up")

    async def rows(self, table: str, key: str) -> dict[str, dict[str, Any]]:
        out = {}
        for rec in await self.pool.fetch(f"SELECT * FROM {self.schema}.{table}"):
            row = dict(rec)
            for c in JSON_COLUMNS & row.keys():
                if isinstance(row[c], str):
                    row[c] = json.loads(row[c])
            out[row[key]] = row
        return out


@pytest.fixture
async def world(services: StackInfo) -> AsyncIterator[World]:
    bootstrap = services.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics)
    await client.start()
    processor = build_processor(clients(bootstrap, topics))
    r = Running(processor, "processor")
    pool = await asyncpg.create_pool(services.database_url, min_size=1, max_size=3)
    red = aioredis.from_url(services.redis_url)
    try:
        await wait_until(
            lambda: r.check() or len(processor.partitions) == 3,
            30,
            what="the processor to own every partition",
        )
        async with contextlib.AsyncExitStack() as parts:
            yield World(services, topics, client, pool, red, parts)
        r.check()
    finally:
        if not r.task.done():
            await r.stop()
        await client.stop()
        await pool.execute(f"DROP SCHEMA IF EXISTS {topics.prefix} CASCADE")
        await pool.close()
        keys = [k async for k in red.scan_iter(RedisKeys(topics.prefix).pattern)]
        if keys:
            await red.delete(*keys)
        await red.aclose()


# the workload --------------------------------------------------------------------------


def new_agents(n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"a-{run}-{i}" for i in range(n)]


def _interleave(seqs: list[list[Any]]) -> list[CommandEnvelope]:
    """One envelope per command, round robin over the sequences (each stays in order)."""
    width = max(map(len, seqs), default=0)
    return [envelope(s[k]) for k in range(width) for s in seqs if k < len(s)]


def agent_commands(agents: list[str], heartbeats: int = 3, register: bool = True) -> list[Any]:
    """Per agent: register and start (unless ``register`` is False), heartbeats, and for
    some a stop, an offline or new capabilities."""
    seqs: list[list[Any]] = []
    for i, a in enumerate(agents):
        seq: list[Any] = []
        if register:
            seq += [
                ag.RegisterAgent(
                    agent_id=a,
                    name=f"agent {i}",
                    max_concurrent_tasks=50,
                    cost_per_task=i * 1000,
                    capabilities=(ag.Capability(name="python", level=0.5),),
                    at=now(),
                ),
                ag.StartAgent(agent_id=a, at=now()),
            ]
        if register or i % 7 != 1:  # a stopped agent sends no heartbeats
            seq += [ag.RecordHeartbeat(agent_id=a, at=now()) for _ in range(heartbeats)]
        if register and i % 7 == 1:
            seq.append(ag.StopAgent(agent_id=a, at=now()))
        elif register and i % 7 == 2:
            seq.append(ag.MarkAgentOffline(agent_id=a, at=now()))
        elif register and i % 7 == 3:
            seq.append(
                ag.UpdateCapabilities(
                    agent_id=a, capabilities=(ag.Capability(name="rust", level=0.9),), at=now()
                )
            )
        seqs.append(seq)
    return seqs


def task_commands(agents: list[str], n_tasks: int) -> list[Any]:
    """Tasks through every ending (completed, failed and retried, failed for good,
    cancelled, requeued); task i goes to agent i % len(agents)."""
    run = uuid.uuid4().hex[:6]
    seqs: list[list[Any]] = []
    for i in range(n_tasks):
        t, a = f"t-{run}-{i}", agents[i % len(agents)]
        seq: list[Any] = [
            tk.SubmitTask(
                task_id=t,
                type="job",
                payload={"n": i},
                required_capabilities=("python",),
                priority=("low", "normal", "high")[i % 3],
                max_cost=10**9,
                at=now(),
            ),
            tk.AssignTask(task_id=t, agent_id=a, at=now()),
        ]
        ending = i % 6
        if ending == 5:
            seq.append(tk.RequeueTask(task_id=t, agent_id=a, reason="lease_expired", at=now()))
        else:
            seq.append(tk.StartTask(task_id=t, agent_id=a, at=now()))
            seq.append(
                tk.ReportProgress(task_id=t, agent_id=a, progress=0.5, message="half", at=now())
            )
            seq.append(
                {
                    0: tk.CompleteTask(
                        task_id=t, agent_id=a, result={"ok": i}, quality=0.8, at=now()
                    ),
                    1: tk.CompleteTask(task_id=t, agent_id=a, at=now()),
                    2: tk.FailTask(task_id=t, agent_id=a, error="flaky", retryable=True, at=now()),
                    3: tk.FailTask(task_id=t, agent_id=a, error="fatal", retryable=False, at=now()),
                    4: tk.CancelTask(task_id=t, at=now()),
                }[ending]
            )
        seqs.append(seq)
    return seqs


def workload(agents: list[str], n_tasks: int, heartbeats: int = 3) -> list[list[CommandEnvelope]]:
    """Two phases: the agents through their lifecycle, then tasks through every ending.

    The agents go first so that every agent is on the log before any task names it
    (the projector's cross-topic ordering is tested on its own)."""
    return [
        _interleave(agent_commands(agents, heartbeats)),
        _interleave(task_commands(agents, n_tasks)),
    ]


async def assert_read_models_match_the_log(w: World) -> list[RecordedEvent]:
    events = await read_events(w.bootstrap, w.topics)
    want_agents, want_tasks = views.fold_rows(events)
    got_agents = await w.rows("agents", "agent_id")
    got_tasks = await w.rows("tasks", "task_id")
    assert got_agents.keys() == want_agents.keys()
    assert got_tasks.keys() == want_tasks.keys()
    wrong_agents = {a for a in want_agents if got_agents[a] != want_agents[a]}
    assert not wrong_agents, _diff(got_agents, want_agents, wrong_agents)
    wrong_tasks = {t for t in want_tasks if got_tasks[t] != want_tasks[t]}
    assert not wrong_tasks, _diff(got_tasks, want_tasks, wrong_tasks)

    archive = await w.pool.fetch(
        f'SELECT event_id, topic, partition, "offset", version, type, aggregate_id'
        f" FROM {w.schema}.events"
    )
    assert len(archive) == len(events), "the archive must hold every event exactly once"
    by_id = {r["event_id"]: r for r in archive}
    for e in events:
        r = by_id[e.id]
        assert e.position is not None
        assert (r["topic"], r["partition"], r["offset"], r["version"], r["type"]) == (
            e.position.topic,
            e.position.partition,
            e.position.offset,
            e.version,
            ce_type_of(e),
        )
    return events


def _diff(got: dict[str, Any], want: dict[str, Any], keys: set[str]) -> str:
    lines = [f"{len(keys)} rows differ from the fold of the log:"]
    for k in sorted(keys)[:8]:
        cols = sorted(c for c in want[k] if got[k].get(c) != want[k][c])
        lines.append(
            f"  {k} (version {got[k].get('version')}): "
            + ", ".join(f"{c} got {got[k].get(c)!r}, log says {want[k][c]!r}" for c in cols)
        )
    return "\n".join(lines)


async def redis_mismatches(w: World) -> dict[str, tuple[Any, Any]]:
    """Agent id -> (Redis lifecycle/status/load, what the rows say) where they differ."""
    agents = await w.rows("agents", "agent_id")
    tasks = await w.rows("tasks", "task_id")
    load = Counter(t["agent_id"] for t in tasks.values() if t["status"] in ("assigned", "running"))
    out = {}
    for agent_id, row in agents.items():
        h = await w.redis.hgetall(RedisKeys(w.topics.prefix).agent(agent_id))
        got = {k.decode(): v.decode() for k, v in h.items()}
        status = row["lifecycle"]
        if status == "running":
            status = "busy" if load[agent_id] else "idle"
        want = (row["lifecycle"], status, str(load[agent_id]))
        if (got.get("lifecycle"), got.get("status"), got.get("load")) != want:
            out[agent_id] = ((got.get("lifecycle"), got.get("status"), got.get("load")), want)
    return out


async def assert_redis_matches_the_rows(w: World, settle_s: float = 3.0) -> None:
    """Redis is written after each commit, so give the last write ``settle_s`` to land."""
    deadline = asyncio.get_running_loop().time() + settle_s
    while (wrong := await redis_mismatches(w)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert not wrong, (
        f"Redis (lifecycle, status, load) != rows for {len(wrong)} agents: "
        + ", ".join(f"{a}: redis {g}, rows {r}" for a, (g, r) in sorted(wrong.items())[:5])
    )


# the tests -----------------------------------------------------------------------------


async def test_the_read_models_are_a_fold_of_the_log(world: World) -> None:
    projector = Running(await world.projector(batch_size=100), "projector")
    try:
        await world.run_phases(workload(new_agents(14), n_tasks=60))
        await world.caught_up()
        events = await assert_read_models_match_the_log(world)
        await assert_redis_matches_the_rows(world)
        projector.check()
    finally:
        await projector.stop()

    agents = await world.rows("agents", "agent_id")
    assert sum(a["tasks_completed"] for a in agents.values()) == 20
    assert sum(a["tasks_failed"] for a in agents.values()) == 20
    assert sum(a["tasks_lost"] for a in agents.values()) == 10
    assert Counter(a["lifecycle"] for a in agents.values()) == {
        "running": 10,
        "stopped": 2,
        "offline": 2,
    }
    tasks = await world.rows("tasks", "task_id")
    assert Counter(t["status"] for t in tasks.values()) == {
        "completed": 20,
        "queued": 20,
        "failed": 10,
        "cancelled": 10,
    }
    assert len(events) > 400


async def test_a_restarted_projector_picks_up_where_it_committed(world: World) -> None:
    agents = new_agents(5)
    first = Running(await world.projector(), "projector-1")
    await world.run_phases(workload(agents, n_tasks=20))
    await world.caught_up()
    await first.stop()

    # While no projector runs: more heartbeats and tasks for the same agents.
    await world.run_all(
        _interleave(agent_commands(agents, register=False) + task_commands(agents, 20))
    )
    second = Running(await world.projector(), "projector-2")
    try:
        await world.caught_up()
        await assert_read_models_match_the_log(world)
        await assert_redis_matches_the_rows(world)
        second.check()
    finally:
        await second.stop()


async def test_a_read_model_rebuilt_from_an_existing_log_is_a_fold_of_the_log(
    world: World,
) -> None:
    # DESIGN: any read model can be rebuilt from the log at any time, into a fresh schema.
    await world.run_phases(workload(new_agents(20), n_tasks=120), projected=False)

    projector = Running(await world.projector(batch_size=50), "projector")
    try:
        await world.caught_up()
        await assert_read_models_match_the_log(world)
        await assert_redis_matches_the_rows(world)
    finally:
        await projector.stop()


async def test_agent_counters_count_tasks_finished_before_the_agent_row_exists(
    world: World,
) -> None:
    # The projector reads the task and agent topics independently, so on a rebuild (or
    # after a restart) it may project a task's completion before the agent's registration.
    # Deterministic version of that: the completion is on the log before the registration.
    projector = Running(await world.projector(), "projector")
    try:
        await world.run_all(
            [
                envelope(tk.SubmitTask(task_id="early", type="job", at=now())),
                envelope(tk.AssignTask(task_id="early", agent_id="late-agent", at=now())),
                envelope(tk.StartTask(task_id="early", agent_id="late-agent", at=now())),
                envelope(tk.CompleteTask(task_id="early", agent_id="late-agent", at=now())),
            ]
        )
        await world.caught_up()
        await world.run_all(
            [envelope(ag.RegisterAgent(agent_id="late-agent", name="late", at=now()))]
        )
        await world.caught_up()
        await assert_read_models_match_the_log(world)
    finally:
        await projector.stop()


async def test_projection_offsets_reach_the_end_offsets_once_caught_up(world: World) -> None:
    projector = Running(await world.projector(), "projector")
    try:
        await world.run_phases(workload(new_agents(3), n_tasks=6))
        await world.caught_up()
        await asyncio.sleep(1.0)  # idle polls: nothing more to read
        ends = await end_offsets(world.bootstrap, world.topics.event_topics.values())
        stored = await world.stored_offsets()
    finally:
        await projector.stop()

    # Rebuild progress and "has the read model caught up with the log" compare these;
    # the transactional writer leaves a commit marker after each batch.
    nonempty = {tp: n for tp, n in ends.items() if n > 0}
    assert {tp: stored.get(tp) for tp in nonempty} == nonempty


async def test_redis_load_drops_when_a_requeue_and_its_queued_event_land_in_different_batches(
    world: World,
) -> None:
    # TaskRequeued leaves the row on its agent; the TaskQueued that follows takes it off.
    # With one record per batch they are always projected in different transactions.
    projector = Running(await world.projector(batch_size=1), "projector")
    try:
        await world.run_all([envelope(ag.RegisterAgent(agent_id="a", name="a", at=now()))])
        await world.run_all([envelope(ag.StartAgent(agent_id="a", at=now()))])
        await world.run_all(
            [
                envelope(tk.SubmitTask(task_id="t1", type="job", at=now())),
                envelope(tk.AssignTask(task_id="t1", agent_id="a", at=now())),
                envelope(tk.SubmitTask(task_id="t2", type="job", at=now())),
                envelope(tk.AssignTask(task_id="t2", agent_id="a", at=now())),
                envelope(tk.StartTask(task_id="t2", agent_id="a", at=now())),
            ]
        )
        await world.caught_up()
        await assert_redis_matches_the_rows(world)  # busy, load 2

        await world.run_all(
            [
                envelope(
                    tk.RequeueTask(task_id="t1", agent_id="a", reason="lease_expired", at=now())
                ),
                envelope(tk.TimeOutTask(task_id="t2", agent_id="a", at=now())),
            ]
        )
        await world.caught_up()
        await assert_read_models_match_the_log(world)
        await assert_redis_matches_the_rows(world)  # idle, load 0
    finally:
        await projector.stop()


async def test_a_malformed_event_record_is_dead_lettered_and_projection_carries_on(
    world: World,
) -> None:
    agents = new_agents(2)
    projector = Running(await world.projector(), "projector")
    try:
        await world.run_phases(workload(agents, n_tasks=4))
        await world.caught_up()
        raw = AIOKafkaProducer(bootstrap_servers=world.bootstrap, enable_idempotence=True)
        await raw.start()
        try:
            meta = await raw.send_and_wait(
                world.topics.events("task"),
                b"\xff\xfe garbage",
                key=b"t-bad",
            )
        finally:
            await raw.stop()
        await world.run_all(_interleave(task_commands(agents, 6)))
        await world.caught_up()
        await assert_read_models_match_the_log(world)
        projector.check()
    finally:
        await projector.stop()

    letters = [
        json.loads(r.value) for r in await read_records(world.bootstrap, world.topics.deadletter)
    ]
    # (How many times is the business of the reads-each-record-once test.)
    assert {(d["topic"], d["partition"], d["offset"]) for d in letters} == {
        (world.topics.events("task"), meta.partition, meta.offset)
    }
    assert "not a CloudEvent" in letters[0]["reason"] and letters[0]["key"] == "t-bad"
    stored = await world.stored_offsets()
    assert stored[TopicPartition(world.topics.events("task"), meta.partition)] > meta.offset


async def test_a_projector_starting_on_an_existing_log_reads_each_record_once(
    world: World,
) -> None:
    # One malformed record at the head of every event-topic partition, then real events:
    # each record must be handled once, so each malformed one is dead-lettered once.
    raw = AIOKafkaProducer(bootstrap_servers=world.bootstrap, enable_idempotence=True)
    await raw.start()
    try:
        for topic in world.topics.event_topics.values():
            for partition in range(world.topics.partitions):
                await raw.send_and_wait(topic, b"junk", key=b"junk", partition=partition)
    finally:
        await raw.stop()
    await world.run_phases(workload(new_agents(6), n_tasks=30), projected=False)
    events = await read_events(world.bootstrap, world.topics)

    projector = await world.projector(batch_size=20)
    r = Running(projector, "projector")
    try:
        await world.caught_up()
        await asyncio.sleep(3.0)  # let any late rewind show itself
        await world.caught_up()
    finally:
        await r.stop()

    letters = [
        json.loads(rec.value)
        for rec in await read_records(world.bootstrap, world.topics.deadletter)
    ]
    sources = Counter((d["topic"], d["partition"], d["offset"]) for d in letters)
    assert len(sources) == len(world.topics.event_topics) * world.topics.partitions
    assert set(sources.values()) == {1}, f"dead-lettered more than once: {sources}"
    assert projector.projected == len(events), "events were read (and decided on) twice"


# the fault test ------------------------------------------------------------------------


async def test_kill_9_of_the_projector_mid_stream_neither_skips_nor_double_applies(
    world: World, tmp_path: Path
) -> None:
    env = role_env(world.services, world.topics.prefix, SWARMLOG_PROJECTOR_BATCH_SIZE="25")
    first = RoleProcess("projector", env, tmp_path / "projector-1.log")
    second: RoleProcess | None = None
    agents = new_agents(60)
    task_topic = world.topics.events("task")
    try:
        await world.run_all(_interleave(agent_commands(agents, heartbeats=2)))
        await world.caught_up(timeout=45)

        # Thousands of task events (and heartbeats) stream in while it projects ...
        stream = asyncio.create_task(
            world.run_all(
                _interleave(agent_commands(agents, 4, register=False) + task_commands(agents, 500)),
                wait_s=60,
            )
        )

        async def task_progress() -> int:
            stored = await world.stored_offsets()
            return sum(n for tp, n in stored.items() if tp.topic == task_topic)

        # ... and it is killed part way through them.
        await wait_until(
            lambda: _between(task_progress(), 500, 2500),
            45,
            interval=0.02,
            what=f"the projector to be part way through the stream\n{first.output()}",
        )
        first.kill9()
        at_kill = await task_progress()
        await stream
        total = sum(n for tp, n in (await world.last_offsets()).items() if tp.topic == task_topic)
        assert at_kill < total, "killed after it had projected everything"

        second = RoleProcess("projector", env, tmp_path / "projector-2.log")
        await world.caught_up(timeout=50)
        events = await assert_read_models_match_the_log(world)
        await assert_redis_matches_the_rows(world)
        assert second.alive(), second.output()
    finally:
        first.kill9()
        if second is not None:
            second.terminate()

    agents_rows = await world.rows("agents", "agent_id")
    completed = sum(isinstance(e.event, tk.TaskCompleted) for e in events)
    assert sum(a["tasks_completed"] for a in agents_rows.values()) == completed
    assert len(events) > 3000
    print(f"killed at task offset sum {at_kill}/{total}; {len(events)} events in the end")


async def _between(value: Any, low: float, high: float) -> bool:
    v = await value
    return low <= v < high

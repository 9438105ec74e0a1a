"""swarmlog on a three-broker KRaft cluster (``swarmlog up --brokers 3``): the topics it
creates are replicated three times with ``min.insync.replicas=2``, and losing a broker
to SIGKILL under load loses no accepted command, doubles no event and does not stop the
command processor; the broker, started again by ``up``, catches up.

The module starts its own cluster (with its own PostgreSQL and Redis) in a temporary
state directory with :func:`infra.stack.up` and stops it by pid at the end, whatever
services the rest of the session uses: killing a broker of the shared stack would harm
the other tests.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from rich.console import Console

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from infra import kafka
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.stack import StackError, StackInfo, down, status, up
from tests.integration.helpers import (
    RoleProcess,
    assert_log_is_clean,
    envelope,
    fresh_topics,
    now,
    read_events,
    read_outcomes,
    role_env,
    wait_until,
)

pytestmark = pytest.mark.integration

BROKERS = 3
INTERNAL_TOPICS = ("__consumer_offsets", "__transaction_state")


@dataclass(frozen=True)
class Cluster:
    info: StackInfo
    state_dir: Path
    start_s: float

    def broker_pids(self) -> dict[int, int | None]:
        """Node id -> pid of each broker (None when it does not run)."""
        kafka_rows = [s for s in status(self.state_dir) if s["name"].startswith("Kafka")]
        return {int(s["name"].split()[1]): s["pid"] for s in kafka_rows}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-broker cluster with its PostgreSQL and Redis, stopped and deleted at the end."""
    state_dir = tmp_path_factory.mktemp("cluster")
    console = Console(stderr=True)
    began = time.monotonic()
    try:
        info = up(state_dir, console=console, brokers=BROKERS, own=True)
    except BaseException:
        down(state_dir, purge=True)
        raise
    start_s = time.monotonic() - began
    print(f"three-broker stack started in {start_s:.1f} s")
    try:
        yield Cluster(info, state_dir, start_s)
    finally:
        for message in down(state_dir, purge=True):
            console.print(message, soft_wrap=True, highlight=False)


async def _describe(bootstrap: str, topics: list[str]) -> dict[str, dict[str, Any]]:
    """Topic -> {"replicas": [per partition], "isr": [...], "min.insync.replicas": str}."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics(topics)}
        resources = [
            ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None})
            for t in topics
        ]
        isr_config: dict[str, str] = {}
        for response in await admin.describe_configs(resources):
            for resource in response.to_object()["resources"]:
                for entry in resource["config_entries"]:
                    isr_config[resource["resource_name"]] = entry["config_value"]
        return {
            t: {
                "replicas": [p["replicas"] for p in described[t]["partitions"]],
                "isr": [p["isr"] for p in described[t]["partitions"]],
                "min.insync.replicas": isr_config.get(t),
            }
            for t in topics
        }
    finally:
        await admin.close()


async def _make_internal_topics(bootstrap: str, topic: str) -> None:
    """Have Kafka create its offsets and transaction-state topics: a transactional
    producer's init and a consumer group's committed offset."""
    producer = kafka.producer(bootstrap, transactional_id=f"cluster-{uuid.uuid4().hex}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"x", key=b"k")
    finally:
        await producer.stop()
    consumer = kafka.consumer(bootstrap, group_id=f"cluster-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        consumer.subscribe([topic])
        await asyncio.wait_for(consumer.getone(), 30)
        await consumer.commit()
    finally:
        await consumer.stop()


async def test_every_topic_has_three_replicas_and_min_insync_replicas_two(
    cluster: Cluster,
) -> None:
    bootstrap = cluster.info.kafka_bootstrap_servers
    assert len(bootstrap.split(",")) == BROKERS
    topics = await fresh_topics(bootstrap)
    await _make_internal_topics(bootstrap, topics.commands)
    names = [s.name for s in topics.specs()] + list(INTERNAL_TOPICS)

    described = await _describe(bootstrap, names)

    for name in names:
        replicas = described[name]["replicas"]
        assert replicas and all(sorted(r) == [1, 2, 3] for r in replicas), (name, replicas)
        assert all(len(isr) == BROKERS for isr in described[name]["isr"]), described[name]
        assert described[name]["min.insync.replicas"] == "2", (name, described[name])


def test_status_shows_each_broker_and_the_cluster_keeps_its_broker_count(
    cluster: Cluster,
) -> None:
    rows = status(cluster.state_dir)
    kafka_rows = [row for row in rows if row["name"].startswith("Kafka")]

    assert [row["name"] for row in kafka_rows] == ["Kafka 1", "Kafka 2", "Kafka 3"]
    assert all(row["running"] and isinstance(row["pid"], int) for row in kafka_rows)
    assert ",".join(row["address"] for row in kafka_rows) == (cluster.info.kafka_bootstrap_servers)
    assert len({row["log"] for row in kafka_rows}) == BROKERS
    with pytest.raises(StackError, match="holds a 3-broker Kafka"):
        up(cluster.state_dir, console=Console(stderr=True), brokers=1, own=True)
    with pytest.raises(StackError, match="use 1 .* or 3 to"):
        up(cluster.state_dir, console=Console(stderr=True), brokers=2, own=True)
    assert cluster.broker_pids() == {int(r["name"][-1]): r["pid"] for r in kafka_rows}


# the fault test ------------------------------------------------------------------------

AGENTS = 10
BATCH = 20
BATCH_EVERY_S = 0.1


def _load(agents: list[str], run: str) -> Iterator[CommandEnvelope]:
    """Commands that are each valid whatever was decided before them (so all are
    accepted however the fault reorders retries): a new task, or a heartbeat of a
    running agent, two to one."""
    rng = random.Random(run)
    for n in range(10**9):
        if n % 3 == 2:
            aid = rng.choice(agents)
            yield envelope(ag.RecordHeartbeat(agent_id=aid, at=now()))
        else:
            yield envelope(tk.SubmitTask(task_id=f"task-{run}-{n}", type="work", at=now()))


class Sender:
    """Submits BATCH commands every BATCH_EVERY_S seconds without waiting for the acks
    (as many clients would), and remembers each command's first send time and whether
    its send failed."""

    def __init__(self, client: CommandClient, commands: Iterator[CommandEnvelope]) -> None:
        self.client = client
        self.commands = commands
        self.sent: dict[str, tuple[float, CommandEnvelope]] = {}
        self.failed: list[CommandEnvelope] = []
        self._stop = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run(), name="sender")

    async def _send(self, batch: list[CommandEnvelope]) -> None:
        try:
            await self.client.send_many(batch)
        except Exception:  # noqa: BLE001 - a client retries those, see resend()
            self.failed.extend(batch)

    async def _run(self) -> None:
        while not self._stop.is_set():
            batch = [next(self.commands) for _ in range(BATCH)]
            at = time.monotonic()
            self.sent.update({c.command_id: (at, c) for c in batch})
            task = asyncio.create_task(self._send(batch))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            await asyncio.sleep(BATCH_EVERY_S)

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        if self._pending:
            await asyncio.wait(self._pending, timeout=120)

    def answered(self, since: float = 0.0) -> int:
        return sum(
            1
            for cid, (at, _) in list(self.sent.items())
            if at >= since and self.client.recent(cid) is not None
        )


async def _roles_of(bootstrap: str, prefix: str, node: int) -> list[str]:
    """What broker ``node`` does for the processor under ``prefix``, for the report."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        roles = [
            f"transaction coordinator of {prefix}-processor-p{p}"
            for p in range(3)
            if await admin.find_coordinator(f"{prefix}-processor-p{p}", 1) == node
        ]
        for d in await admin.describe_topics([f"{prefix}.commands"]):
            roles += [
                f"leader of {prefix}.commands/{p['partition']}"
                for p in d["partitions"]
                if p["leader"] == node
            ]
        return roles
    finally:
        await admin.close()


async def test_sigkill_of_a_broker_under_load_loses_no_accepted_command_and_doubles_no_event(
    cluster: Cluster, tmp_path: Path
) -> None:
    began = time.monotonic()
    bootstrap = cluster.info.kafka_bootstrap_servers
    topics = await fresh_topics(bootstrap)
    client = CommandClient(Kafka(bootstrap), topics, remember_bytes=1024**3)
    await client.start()
    processor = RoleProcess("processor", role_env(cluster.info, topics.prefix), tmp_path / "p.log")
    run = uuid.uuid4().hex[:6]
    agents = [f"agent-{run}-{i}" for i in range(AGENTS)]
    setup = [envelope(ag.RegisterAgent(agent_id=a, name=a, at=now())) for a in agents]
    setup += [envelope(ag.StartAgent(agent_id=a, at=now())) for a in agents]
    sender: Sender | None = None
    victim: int | None = None
    try:
        outcomes = await client.execute_many(setup, 90)
        assert all(o is not None for o in outcomes), f"no processor:\n{processor.output()}"

        # The broker coordinating the processor's first transactional id: killing it
        # interrupts transactions mid-flight, not only leadership.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            victim = await admin.find_coordinator(f"{topics.prefix}-processor-p0", 1)
        finally:
            await admin.close()
        roles = await _roles_of(bootstrap, topics.prefix, victim)
        pids = cluster.broker_pids()
        victim_pid = pids[victim]
        assert victim_pid is not None

        sender = Sender(client, _load(agents, run))
        await wait_until(lambda: sender.answered() >= 300, 60, what="300 outcomes before the kill")

        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_until(lambda: cluster.broker_pids()[victim] is None, 10, what="the broker gone")
        # Processing goes on with two brokers: commands sent after the kill are decided.
        await wait_until(
            lambda: sender.answered(since=killed_at) > 0,
            60,
            interval=0.1,
            what="an outcome of a command sent after the kill",
        )
        first_outcome_s = time.monotonic() - killed_at
        await wait_until(
            lambda: sender.answered(since=killed_at) >= 1000,
            90,
            interval=0.2,
            what="1000 outcomes of commands sent after the kill",
        )
        await asyncio.sleep(max(0.0, killed_at + 15 - time.monotonic()))  # 15 s on two
        two_brokers_s = time.monotonic() - killed_at
        assert cluster.broker_pids()[victim] is None, "the broker came back by itself"
        assert processor.alive(), processor.output()
        sent_with_two = sum(1 for at, _ in sender.sent.values() if at >= killed_at)

        restarted_at = time.monotonic()
        again = up(cluster.state_dir, console=Console(stderr=True), brokers=BROKERS, own=True)
        restart_s = time.monotonic() - restarted_at
        after = cluster.broker_pids()
        assert again.kafka_bootstrap_servers == bootstrap
        assert {n: p for n, p in after.items() if n != victim} == {
            n: p for n, p in pids.items() if n != victim
        }, "up restarted a broker that was running"
        assert after[victim] not in (None, victim_pid)

        await asyncio.sleep(5)  # load on the full cluster again
        await sender.stop()
        # Every command whose send was acknowledged (acks=all) is decided, unsent again.
        failed = {c.command_id for c in sender.failed}
        await wait_until(
            lambda: all(client.recent(cid) is not None for cid in sender.sent if cid not in failed),
            120,
            interval=0.2,
            what="an outcome for every acknowledged command",
        )
        # What a client does with a send that failed: send it again, same id.
        if sender.failed:
            await client.send_many(sender.failed)
        await wait_until(
            lambda: sender.answered() == len(sender.sent),
            120,
            interval=0.2,
            what="an outcome for every command",
        )
        assert processor.alive(), processor.output()

        # The restarted broker catches up: every replica of our topics is in sync again.
        names = [s.name for s in topics.specs()] + list(INTERNAL_TOPICS)

        async def in_sync() -> bool:
            described = await _describe(bootstrap, names)
            return all(len(isr) == BROKERS for d in described.values() for isr in d["isr"])

        await wait_until(in_sync, 120, interval=1.0, what="every replica back in sync")
    finally:
        if sender is not None and not sender._task.done():
            await sender.stop()
        processor.terminate()
        await client.stop()

    commands = [c for _, c in sender.sent.values()]
    outcomes_by_id = {c.command_id: client.recent(c.command_id) for c in commands}
    statuses = Counter(o.status for o in outcomes_by_id.values() if o)
    assert statuses == {"accepted": len(commands)}, statuses
    events = await read_events(bootstrap, topics)
    assert_log_is_clean(events)
    on_log = Counter(e.id for e in events)
    # Setup commands' events count too: every accepted outcome's events are on the log once.
    promised = [e.id for o in outcomes_by_id.values() if o for e in o.events]
    promised += [e.id for o in outcomes if o for e in o.events]
    assert len(promised) == len(set(promised)), "two outcomes promise the same event"
    assert set(on_log) == set(promised), "events on the log and accepted outcomes differ"
    assert all(count == 1 for count in on_log.values())
    decided = Counter(
        o.command_id for o in await read_outcomes(bootstrap, topics) if not o.duplicate
    )
    assert all(decided[c.command_id] == 1 for c in commands), "a command was decided twice"
    print(
        f"killed broker {victim} ({', '.join(roles) or 'no leader of ours'});"
        f" {len(commands)} commands ({sent_with_two} sent in {two_brokers_s:.1f} s on two"
        f" brokers), {len(sender.failed)} sends failed and were resent; first outcome of a"
        f" command sent after the kill {first_outcome_s:.1f} s after it; broker restart"
        f" {restart_s:.1f} s;"
        f" stack start {cluster.start_s:.1f} s; test {time.monotonic() - began:.1f} s"
    )

"""The scheduler runner against real Kafka, with the real command processor: tasks go to
capable agents, leases and heartbeats are enforced on the runner's clock, and of several
copies one leads, none assigns a task twice, and a standby takes over.

Where a ``ManualClock`` drives the runner, every command the test sends carries that
clock's time too (the deciders compare times on commands, e.g. a retry's not_before).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from infra.bootstrap import build_scheduler
from infra.clock import Clock, ManualClock
from infra.stack import StackInfo
from infra.topics import Topics
from streams.scheduler import Policy
from streams.scheduler_runner import SchedulerRunner
from tests.integration.helpers import (
    EventFollower,
    Running,
    clients,
    envelope,
    now,
    processor_with_client,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 20.0


@dataclass
class Swarm:
    bootstrap: str
    topics: Topics
    client: CommandClient
    log: EventFollower
    clock: ManualClock

    def runner(self, policy: Policy | None = None, clock: Clock | None = None) -> SchedulerRunner:
        policy = policy or Policy(heartbeat_timeout_s=3600, aging_interval_s=30)
        return build_scheduler(
            clients(
                self.bootstrap,
                self.topics,
                clock=clock or self.clock,
                scheduler_tick_s=0.05,
                heartbeat_timeout_s=policy.heartbeat_timeout_s,
                aging_interval_s=policy.aging_interval_s,
            )
        )

    async def do(self, *commands: object, at: datetime | None = None) -> None:
        """Send commands (in order) and require every one to be accepted."""
        envs = [envelope(c) for c in commands]  # type: ignore[arg-type]
        outcomes = await self.client.execute_many(envs, WAIT)
        for env, o in zip(envs, outcomes, strict=True):
            assert o is not None, f"no outcome for {env.command!r}"
            assert o.status == "accepted", f"{env.command!r}: {o.rejection}"

    async def agent(
        self, agent_id: str, skills: dict[str, float], *, max_concurrent: int = 1
    ) -> None:
        """Register and start an agent, at the manual clock's time."""
        t = self.clock.now()
        await self.do(
            ag.RegisterAgent(
                agent_id=agent_id,
                name=agent_id,
                capabilities=tuple(ag.Capability(name=n, level=v) for n, v in skills.items()),
                max_concurrent_tasks=max_concurrent,
                at=t,
            ),
            ag.StartAgent(agent_id=agent_id, at=t),
        )

    async def submit(self, task_id: str, required: tuple[str, ...] = (), **kw: object) -> None:
        await self.do(
            tk.SubmitTask(
                task_id=task_id,
                type="job",
                required_capabilities=required,
                at=self.clock.now(),
                **kw,  # type: ignore[arg-type]
            )
        )


@pytest.fixture
async def swarm(services: StackInfo) -> AsyncIterator[Swarm]:
    bootstrap = services.kafka_bootstrap_servers
    async with processor_with_client(bootstrap) as (topics, client, log):
        yield Swarm(bootstrap, topics, client, log, ManualClock(start=now()))


async def leading(runner: Running, timeout: float = 30.0) -> None:
    """Wait until ``runner`` leads and has rebuilt its view from the log."""
    role: SchedulerRunner = runner.role  # type: ignore[assignment]
    await wait_until(
        lambda: runner.check() or (role.leader.is_set() and role.caught_up.is_set()),
        timeout,
        what="the scheduler to lead and catch up",
    )


def assignments(swarm: Swarm) -> list[tuple[str, str, int]]:
    """(task, agent, attempt) of every TaskAssigned on the log, in arrival order."""
    return [
        (e.aggregate_id, e.event.agent_id, e.event.attempt)  # type: ignore[attr-defined]
        for e in swarm.log.of(tk.TaskAssigned)
    ]


# ---------------------------------------------------------------------------------------


async def test_a_task_is_assigned_to_the_agent_that_has_the_capability(swarm: Swarm) -> None:
    await swarm.agent("py", {"python": 1.0})
    await swarm.agent("rs", {"rust": 0.3})
    runner = Running(swarm.runner(), "scheduler")
    try:
        await leading(runner)
        await swarm.submit("needs-rust", ("rust",))
        await swarm.submit("needs-go", ("go",))

        await swarm.log.wait_for(tk.TaskAssigned, task_id="needs-rust")
        await asyncio.sleep(0.5)  # several ticks: nothing else may be assigned
        runner.check()
    finally:
        await runner.stop()

    assert assignments(swarm) == [("needs-rust", "rs", 1)]


async def test_an_expired_lease_requeues_the_task_and_it_is_assigned_again(swarm: Swarm) -> None:
    await swarm.agent("a", {"python": 0.9})
    await swarm.agent("b", {"python": 0.5})
    runner = Running(swarm.runner(), "scheduler")
    try:
        await leading(runner)
        await swarm.submit("t1", ("python",), lease_timeout_s=5.0)
        await swarm.log.wait_for(tk.TaskAssigned, task_id="t1")
        await asyncio.sleep(0.3)
        assert swarm.log.of(tk.TaskRequeued) == [], "requeued before the lease ran out"

        swarm.clock.advance(6)  # the agent never started it

        requeued = await swarm.log.wait_for(tk.TaskRequeued, task_id="t1")
        await swarm.log.wait_for(tk.TaskAssigned, 2, task_id="t1")
        runner.check()
    finally:
        await runner.stop()

    assert [(e.event.agent_id, e.event.reason) for e in requeued] == [("a", "lease_expired")]  # type: ignore[attr-defined]
    assert [a[2] for a in assignments(swarm)] == [1, 2]


async def test_an_agent_whose_heartbeats_stop_goes_offline_and_its_task_moves(
    swarm: Swarm,
) -> None:
    await swarm.agent("strong", {"python": 0.9})
    await swarm.agent("weak", {"python": 0.2})
    runner = Running(swarm.runner(Policy(heartbeat_timeout_s=10)), "scheduler")
    try:
        await leading(runner)
        await swarm.submit("t1", ("python",))
        await swarm.log.wait_for(tk.TaskAssigned, task_id="t1", agent_id="strong")
        await swarm.do(tk.StartTask(task_id="t1", agent_id="strong", at=swarm.clock.now()))

        # 20 s pass: only "weak" keeps beating.
        later = swarm.clock.now() + timedelta(seconds=20)
        await swarm.do(ag.RecordHeartbeat(agent_id="weak", at=later))
        swarm.clock.advance(20)

        offline = await swarm.log.wait_for(ag.AgentMarkedOffline)
        requeued = await swarm.log.wait_for(tk.TaskRequeued, task_id="t1")
        moved = await swarm.log.wait_for(tk.TaskAssigned, task_id="t1", agent_id="weak")
        await asyncio.sleep(0.3)
        runner.check()
    finally:
        await runner.stop()

    assert [e.aggregate_id for e in swarm.log.of(ag.AgentMarkedOffline)] == ["strong"]
    assert offline[0].event.reason == "heartbeat_timeout"  # type: ignore[attr-defined]
    assert [(e.event.agent_id, e.event.reason) for e in requeued] == [("strong", "agent_offline")]  # type: ignore[attr-defined]
    assert [e.event.attempt for e in moved] == [2]  # type: ignore[attr-defined]


async def test_a_retry_is_not_assigned_before_its_backoff_is_over(swarm: Swarm) -> None:
    await swarm.agent("a", {"python": 0.9})
    runner = Running(swarm.runner(), "scheduler")
    try:
        await leading(runner)
        await swarm.submit("t1", ("python",))
        await swarm.log.wait_for(tk.TaskAssigned, task_id="t1")
        t = swarm.clock.now()
        await swarm.do(
            tk.StartTask(task_id="t1", agent_id="a", at=t),
            tk.FailTask(task_id="t1", agent_id="a", error="flaky", retryable=True, at=t),
        )
        (retry,) = await swarm.log.wait_for(tk.TaskRetryScheduled, task_id="t1")
        await asyncio.sleep(0.5)
        assert len(swarm.log.of(tk.TaskAssigned)) == 1, "assigned before not_before"

        wait = (retry.event.not_before - swarm.clock.now()).total_seconds()  # type: ignore[attr-defined]
        swarm.clock.advance(wait + 0.01)
        await swarm.log.wait_for(tk.TaskAssigned, 2, task_id="t1")
        runner.check()
    finally:
        await runner.stop()

    assert assignments(swarm) == [("t1", "a", 1), ("t1", "a", 2)]


async def test_of_two_scheduler_copies_one_leads_and_no_task_is_assigned_twice(
    swarm: Swarm,
) -> None:
    clock = None  # both on the system clock, like two real processes
    for i in range(3):
        await swarm.agent(f"a{i}", {"python": 0.5 + i / 10}, max_concurrent=10)
    first = Running(swarm.runner(clock=clock), "scheduler-1")  # type: ignore[arg-type]
    second = Running(swarm.runner(clock=clock), "scheduler-2")  # type: ignore[arg-type]
    copies = [first, second]
    try:

        def leaders() -> list[Running]:
            return [c for c in copies if c.role.leader.is_set()]  # type: ignore[attr-defined]

        await _stable(lambda: len(leaders()) == 1, hold_s=1.5, timeout=30)
        (leader,) = leaders()
        standby = second if leader is first else first
        await leading(leader)

        for i in range(20):
            await swarm.submit(f"t{i}", ("python",))
        await wait_until(
            lambda: len({a[0] for a in assignments(swarm)}) == 20,
            WAIT,
            what="all 20 tasks assigned",
        )
        await asyncio.sleep(1.0)
        assert not standby.role.leader.is_set()  # type: ignore[attr-defined]
        assert standby.role.sent == 0, "the standby sent commands"  # type: ignore[attr-defined]

        # The leader goes away; the standby takes over and carries on.
        await leader.stop()
        await leading(standby, timeout=30)
        for i in range(20, 25):
            await swarm.submit(f"t{i}", ("python",))
        await wait_until(
            lambda: len({a[0] for a in assignments(swarm)}) == 25,
            WAIT,
            what="the 5 new tasks assigned by the new leader",
        )
        await asyncio.sleep(1.0)
        standby.check()
    finally:
        for c in copies:
            if not c.task.done():
                await c.stop()

    per_attempt = Counter((task, attempt) for task, _, attempt in assignments(swarm))
    assert set(per_attempt.values()) == {1}, f"assigned twice: {per_attempt.most_common(3)}"
    assert {attempt for _, attempt in per_attempt} == {1}
    load = Counter(agent for _, agent, _ in assignments(swarm))
    assert max(load.values()) <= 10, f"an agent got more than its capacity: {load}"


async def _stable(predicate, hold_s: float, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``predicate()`` has been true for ``hold_s`` seconds in a row."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    while time.monotonic() < deadline:
        if predicate():
            since = since or time.monotonic()
            if time.monotonic() - since >= hold_s:
                return
        else:
            since = None
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held steadily")


async def test_a_restarted_scheduler_respects_work_already_held(swarm: Swarm) -> None:
    # A new leader rebuilds its view by reading the agent and task topics; whichever it
    # happens to read first, agents busy before the restart must still count as busy.
    for i in range(3):
        await swarm.agent(f"a{i}", {"python": 0.9 - i / 10}, max_concurrent=1)
    first = Running(swarm.runner(), "scheduler-1")
    try:
        await leading(first)
        for i in range(3):
            await swarm.submit(f"held-{i}", ("python",))
        await wait_until(lambda: len(assignments(swarm)) == 3, WAIT, what="3 assignments")
    finally:
        await first.stop()

    for i in range(3):
        await swarm.submit(f"waiting-{i}", ("python",))
    second = Running(swarm.runner(), "scheduler-2")
    try:
        await leading(second)
        await asyncio.sleep(1.0)  # many ticks
        second.check()
    finally:
        await second.stop()

    assert sorted(a[1] for a in assignments(swarm)) == ["a0", "a1", "a2"], (
        f"an agent at capacity got more work: {assignments(swarm)}"
    )

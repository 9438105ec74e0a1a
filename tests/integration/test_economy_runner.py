"""The economy runner against real Kafka with the real command processor: rewards are
paid once (also when a new runner refolds and replays the whole log, when the causing
command is replayed, and when the streams worker is killed with SIGKILL mid-stream),
lost tasks slash, credits land, and governance closes and executes on an injected
ManualClock.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from commands.client import CommandClient
from domain import account as ac
from domain import agent as ag
from domain import proposal as pr
from domain import task as tk
from domain.economy import TREASURY, ParameterChange
from domain.ids import derived_id
from domain.messages import MICRO, Command
from infra.bootstrap import build_economy
from infra.clock import ManualClock
from infra.stack import StackInfo
from infra.topics import Topics
from streams.economy_runner import EconomyRunner
from tests.integration.helpers import (
    EventFollower,
    RoleProcess,
    Running,
    clients,
    envelope,
    now,
    processor_with_client,
    read_events,
    role_env,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 20.0


@dataclass
class World:
    bootstrap: str
    topics: Topics
    client: CommandClient
    log: EventFollower
    clock: ManualClock

    def runner(self) -> EconomyRunner:
        return build_economy(
            clients(
                self.bootstrap,
                self.topics,
                clock=self.clock,
                scheduler_tick_s=0.05,
                economy_resend_s=1.0,
            )
        )

    async def do(self, *commands: Command) -> None:
        envs = [envelope(c) for c in commands]
        outcomes = await self.client.execute_many(envs, WAIT)
        for env, o in zip(envs, outcomes, strict=True):
            assert o is not None, f"no outcome for {env.command!r}"
            assert o.status == "accepted", f"{env.command!r}: {o.rejection}"

    async def agent_with_stake(self, agent_id: str, stake: int) -> None:
        t = self.clock.now()
        await self.do(ag.RegisterAgent(agent_id=agent_id, name=agent_id, at=t))
        await self.log.wait_for(ac.AccountOpened, account_id=agent_id)
        await self.do(ac.GrantTokens(account_id=TREASURY, to=agent_id, amount=stake, at=t))
        await self.log.wait_for(ac.TransferReceived, account_id=agent_id)
        await self.do(ac.StakeTokens(account_id=agent_id, amount=stake, at=t))

    async def run_task(self, task_id: str, agent_id: str, finish: str = "complete") -> None:
        t = self.clock.now()
        await self.do(
            tk.SubmitTask(task_id=task_id, type="job", at=t),
            tk.AssignTask(task_id=task_id, agent_id=agent_id, at=t),
            tk.StartTask(task_id=task_id, agent_id=agent_id, at=t),
        )
        if finish == "complete":
            await self.do(tk.CompleteTask(task_id=task_id, agent_id=agent_id, quality=0.8, at=t))
        else:
            await self.do(tk.TimeOutTask(task_id=task_id, agent_id=agent_id, at=t))


@pytest.fixture
async def world(services: StackInfo) -> AsyncIterator[World]:
    bootstrap = services.kafka_bootstrap_servers
    async with processor_with_client(bootstrap) as (topics, client, log):
        yield World(bootstrap, topics, client, log, ManualClock(start=now()))


async def leading(runner: EconomyRunner, running: Running) -> None:
    await wait_until(
        lambda: running.check() or runner.caught_up.is_set(), 30, what="the economy runner to lead"
    )


def ledger_of(events: list) -> ac.LedgerTotals:  # type: ignore[type-arg]
    states: dict[str, ac.AccountState | None] = {}
    account_events = []
    for s in events:
        if isinstance(s.event, ac.AccountEvent):
            states[s.aggregate_id] = ac.ACCOUNT_DECIDER.evolve(states.get(s.aggregate_id), s.event)
            account_events.append(s.event)
    return ac.ledger_totals([x for x in states.values() if x is not None], account_events)


async def test_rewards_are_paid_once_even_when_the_log_is_replayed(world: World) -> None:
    runner = world.runner()
    running = Running(runner, "economy")
    try:
        await leading(runner, running)
        await world.agent_with_stake("a1", 1_000 * MICRO)  # gold x1.5
        await world.log.wait_for(ac.TierChanged, account_id="a1", tier="gold")
        await asyncio.sleep(0.5)  # the runner folds the tier before the completion
        await world.run_task("t1", "a1")
        [accrued] = await world.log.wait_for(ac.RewardAccrued, account_id="a1", task_id="t1")
        assert accrued.event.amount == 12 * MICRO  # 10 x 1.5 x 0.8
    finally:
        await running.stop()
    # A new runner refolds the whole log: every event is read again.
    again = world.runner()
    running = Running(again, "economy-2")
    try:
        await leading(again, running)
        await asyncio.sleep(2.0)  # more than resend_s: anything owed would have been sent
        assert again.sent == 0
        assert again.view.rewards == {} and again.view.debits == {}
    finally:
        await running.stop()
    # Replaying the reward command itself (same derived id) writes nothing.
    completed = world.log.of(tk.TaskCompleted, task_id="t1")[0]
    replay = envelope(
        ac.PayReward(
            account_id=TREASURY,
            to="a1",
            amount=12 * MICRO,
            task_id="t1",
            cause=completed.id,
            at=world.clock.now(),
        ),
        derived_id("reward", completed.id),
    )
    [outcome] = await world.client.execute_many([replay], WAIT)
    assert outcome is not None and outcome.duplicate
    events = await read_events(world.bootstrap, world.topics)
    paid = [e for e in events if isinstance(e.event, ac.TransferSent) and e.event.kind == "reward"]
    assert len(paid) == 1
    assert len([e for e in events if isinstance(e.event, ac.RewardAccrued)]) == 1
    totals = ledger_of(events)
    assert totals.balanced and totals.in_flight == 0


async def test_a_timed_out_started_task_slashes_into_the_treasury(world: World) -> None:
    runner = world.runner()
    running = Running(runner, "economy")
    try:
        await leading(runner, running)
        await world.agent_with_stake("a1", 2_000 * MICRO)
        await world.log.wait_for(ac.TierChanged, account_id="a1", tier="gold")
        await asyncio.sleep(0.5)
        await world.run_task("t1", "a1", finish="timeout")
        [slashed] = await world.log.wait_for(ac.StakeSlashed, account_id="a1")
        assert slashed.event.amount == 200 * MICRO
        await world.log.wait_for(ac.TransferReceived, account_id=TREASURY, kind="slash")
    finally:
        await running.stop()
    totals = ledger_of(await read_events(world.bootstrap, world.topics))
    assert totals.balanced and totals.in_flight == 0


async def create_proposal(world: World, pid: str, window_s: int) -> None:
    await world.do(
        pr.CreateProposal(
            proposal_id=pid,
            title=pid,
            proposer="a",
            change=ParameterChange(base_reward=20 * MICRO),
            window_s=window_s,
            quorum_bp=5_000,
            threshold_bp=5_000,
            powers=(
                pr.VoterPower(account_id="a", power=600),
                pr.VoterPower(account_id="b", power=300),
                pr.VoterPower(account_id="c", power=100),
            ),
            at=world.clock.now(),
        )
    )


async def test_governance_passed_rejected_and_quorum_missed_on_a_manual_clock(world: World) -> None:
    runner = world.runner()
    running = Running(runner, "economy")
    try:
        await leading(runner, running)
        for pid in ("passes", "fails", "quiet"):
            await create_proposal(world, pid, 3600)
        t = world.clock.now()
        await world.do(
            pr.CastVote(proposal_id="passes", voter="a", choice="for", at=t),
            pr.CastVote(proposal_id="fails", voter="a", choice="against", at=t),
            pr.CastVote(proposal_id="fails", voter="b", choice="for", at=t),
            pr.CastVote(proposal_id="quiet", voter="c", choice="for", at=t),
        )
        await asyncio.sleep(1.0)
        assert world.log.of(pr.ProposalClosed) == []  # the deadline has not come
        world.clock.advance(3600)
        closed = await world.log.wait_for(pr.ProposalClosed, count=3)
        outcomes = {e.aggregate_id: e.event.outcome for e in closed}
        assert outcomes == {"passes": "passed", "fails": "rejected", "quiet": "quorum_missed"}
        [executed] = await world.log.wait_for(pr.ProposalExecuted)
        assert executed.aggregate_id == "passes"
        await wait_until(
            lambda: runner.view.params.base_reward == 20 * MICRO,
            10,
            what="the new base reward in force",
        )
        # Rewards from now on use it.
        await world.agent_with_stake("a1", 1)
        await world.run_task("t1", "a1")
        [accrued] = await world.log.wait_for(ac.RewardAccrued, account_id="a1")
        assert accrued.event.amount == 16 * MICRO  # 20 x 1.0 x 0.8
    finally:
        await running.stop()


async def test_kill_9_of_the_streams_worker_mid_stream_leaves_the_ledger_exact(
    world: World, services: StackInfo, tmp_path: Path
) -> None:
    agents = [f"ag-{i}" for i in range(4)]
    env = role_env(services, world.topics.prefix)
    worker = RoleProcess("streams", env, tmp_path / "streams-1.log")
    try:
        t = world.clock.now()
        # Registered, never started: the scheduler in the worker leaves their tasks alone.
        await world.do(*(ag.RegisterAgent(agent_id=a, name=a, at=t) for a in agents))
        await world.log.wait_for(ac.AccountOpened, count=len(agents), timeout=60)
        n = 40
        for i in range(n):
            agent = agents[i % len(agents)]
            tid = f"job-{i}"
            await world.do(
                tk.SubmitTask(task_id=tid, type="job", at=t),
                tk.AssignTask(task_id=tid, agent_id=agent, at=t),
                tk.StartTask(task_id=tid, agent_id=agent, at=t),
                tk.CompleteTask(task_id=tid, agent_id=agent, quality=0.5, at=t),
            )
            if i == n // 2:
                await world.log.wait_for(ac.RewardAccrued, count=1, timeout=60)
                assert worker.alive(), worker.output()
                worker.kill9()
                worker = RoleProcess("streams", env, tmp_path / "streams-2.log")
        await world.log.wait_for(ac.RewardAccrued, count=n, timeout=90)
        await asyncio.sleep(3.0)  # anything paid twice would show by now
    finally:
        worker.terminate()
    events = await read_events(world.bootstrap, world.topics)
    paid = Counter(
        e.event.task_id
        for e in events
        if isinstance(e.event, ac.TransferSent) and e.event.kind == "reward"
    )
    assert len(paid) == 40 and set(paid.values()) == {1}, paid
    accrued = [e for e in events if isinstance(e.event, ac.RewardAccrued)]
    assert len(accrued) == 40 and {e.event.amount for e in accrued} == {5 * MICRO}
    totals = ledger_of(events)
    assert totals.balanced and totals.in_flight == 0
    assert totals.balances == 40 * 5 * MICRO

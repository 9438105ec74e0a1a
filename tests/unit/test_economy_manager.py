"""The economy process manager, pure: given these events, when it plans at time T, then
these commands; and, run against the deciders in memory, the ledger it leaves behind.

``World`` is a command loop with no IO: commands go through the real deciders (with
the processor's rules: a repeated command id writes nothing, an expected version must
match), their events are folded into the process manager's view, and ``settle`` plans
and sends until nothing more is owed.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from domain import account as ac
from domain import agent as ag
from domain import proposal as pr
from domain import task as tk
from domain.economy import TREASURY, EconomyParameters, ParameterChange
from domain.ids import event_id
from domain.messages import MICRO, Command, Rejection
from domain.recorded import RecordedEvent
from domain.registry import DECIDERS
from streams.economy import EconomyView, apply, plan

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


class World:
    """The deciders and the economy process manager, in memory."""

    def __init__(self) -> None:
        self.view = EconomyView()
        self.states: dict[tuple[str, str], Any] = {}
        self.versions: dict[tuple[str, str], int] = defaultdict(int)
        self.decided: set[str] = set()
        self.log: list[RecordedEvent] = []
        self.rejections: list[Rejection] = []
        self.n = 0

    def send(
        self, command: Command, command_id: str | None = None, expected: int | None = None
    ) -> list[RecordedEvent] | Rejection:
        self.n += 1
        cid = command_id or f"cmd-{self.n}"
        if cid in self.decided:
            return []
        key = (command.aggregate_type, command.aggregate_id)
        decider = DECIDERS[command.aggregate_type]
        if expected is not None and expected != self.versions[key]:
            return Rejection(kind="precondition", code="version_mismatch", detail="")
        result = decider.decide(command, self.states.get(key))
        self.decided.add(cid)
        if isinstance(result, Rejection):
            self.rejections.append(result)
            return result
        out = []
        for i, e in enumerate(result):
            self.versions[key] += 1
            self.states[key] = decider.evolve(self.states.get(key), e)
            stored = RecordedEvent(
                id=event_id(cid, i),
                aggregate_type=key[0],
                aggregate_id=key[1],
                version=self.versions[key],
                time=command.at,
                correlation_id=cid,
                causation_id=cid,
                event=e,
            )
            out.append(stored)
            self.log.append(stored)
            apply(self.view, stored)
        return out

    def settle(self, now: datetime, rounds: int = 10) -> int:
        """Plan and send until nothing new is accepted; the number of commands sent."""
        sent = 0
        for _ in range(rounds):
            before = len(self.log)
            for p in plan(self.view, now):
                self.send(p.command, p.command_id, p.expected_version)
                sent += 1
            if len(self.log) == before:
                break
        return sent

    def account(self, aid: str) -> ac.AccountState:
        return self.states[("account", aid)]

    def totals(self) -> ac.LedgerTotals:
        return ac.ledger_totals(
            [s for (k, _), s in self.states.items() if k == "account"],
            [e.event for e in self.log if isinstance(e.event, ac.AccountEvent)],
        )

    # scenarios ------------------------------------------------------------------------

    def agent_with_stake(self, agent_id: str, stake: int) -> None:
        self.send(ag.RegisterAgent(agent_id=agent_id, name=agent_id, at=t(0)))
        self.settle(t(0))
        self.send(
            ac.GrantTokens(account_id=TREASURY, to=agent_id, amount=stake + 5 * MICRO, at=t(0))
        )
        self.settle(t(0))
        self.send(ac.StakeTokens(account_id=agent_id, amount=stake, at=t(0)))

    def run_task(
        self, task_id: str, agent_id: str, quality: float = 1.0, finish: str = "complete"
    ) -> RecordedEvent:
        self.send(tk.SubmitTask(task_id=task_id, type="x", at=t(1)))
        self.send(tk.AssignTask(task_id=task_id, agent_id=agent_id, at=t(1)))
        self.send(tk.StartTask(task_id=task_id, agent_id=agent_id, at=t(2)))
        if finish == "complete":
            out = self.send(
                tk.CompleteTask(task_id=task_id, agent_id=agent_id, quality=quality, at=t(3))
            )
        elif finish == "timeout":
            out = self.send(tk.TimeOutTask(task_id=task_id, agent_id=agent_id, at=t(3)))
        else:
            out = self.send(
                tk.RequeueTask(task_id=task_id, agent_id=agent_id, reason="agent_offline", at=t(3))
            )
        assert isinstance(out, list)
        return out[0]


def test_a_registered_agent_gets_an_account() -> None:
    w = World()
    w.send(ag.RegisterAgent(agent_id="a1", name="a1", at=t(0)))
    [p] = plan(w.view, t(0))
    assert p.command == ac.OpenAccount(account_id="a1", holder="agent", at=t(0))
    w.settle(t(0))
    assert w.account("a1").holder == "agent"
    assert plan(w.view, t(1)) == []


def test_a_completed_task_pays_base_times_tier_times_quality_once() -> None:
    w = World()
    w.agent_with_stake("a1", 1_000 * MICRO)  # gold: x1.5
    w.run_task("t1", "a1", quality=0.5)
    w.settle(t(4))
    assert w.account("a1").earned == 7_500_000  # 10 tokens x 1.5 x 0.5
    assert w.totals().balanced and w.totals().in_flight == 0
    # Replaying every event into a fresh view plans the same ids: nothing is paid twice.
    fresh = EconomyView()
    for stored in w.log:
        apply(fresh, stored)
    assert plan(fresh, t(9)) == []
    w.view = EconomyView()
    for stored in w.log:
        apply(w.view, stored)
    w.settle(t(9))
    assert w.account("a1").earned == 7_500_000


def test_a_replayed_completion_pays_once() -> None:
    w = World()
    w.agent_with_stake("a1", 0 + 1)
    done = w.run_task("t1", "a1")
    w.settle(t(4))
    paid = w.account("a1").earned
    assert paid == 10 * MICRO
    # The completion is read again (a rebalance, a restart before the offsets moved):
    w.view.rewards_settled.clear()
    apply(w.view, done)
    planned = plan(w.view, t(5))
    assert len(planned) == 1
    w.settle(t(5))
    assert w.account("a1").earned == paid


def test_a_lost_task_that_was_started_slashes_the_governed_rate() -> None:
    for finish in ("timeout", "requeue"):
        w = World()
        w.agent_with_stake("a1", 1_000 * MICRO)
        w.run_task("t1", "a1", finish=finish)
        w.settle(t(4))
        assert w.account("a1").slashed == 100 * MICRO  # 10 %
        assert w.account(TREASURY).balance == 100 * MICRO
        assert w.totals().balanced and w.totals().in_flight == 0


def test_a_task_lost_before_it_started_slashes_nothing() -> None:
    w = World()
    w.agent_with_stake("a1", 1_000 * MICRO)
    w.send(tk.SubmitTask(task_id="t1", type="x", at=t(1)))
    w.send(tk.AssignTask(task_id="t1", agent_id="a1", at=t(1)))
    w.send(tk.RequeueTask(task_id="t1", agent_id="a1", reason="lease_expired", at=t(40)))
    assert plan(w.view, t(41)) == []


def test_an_agent_with_no_stake_is_not_slashed() -> None:
    w = World()
    w.send(ag.RegisterAgent(agent_id="a1", name="a1", at=t(0)))
    w.settle(t(0))
    w.run_task("t1", "a1", finish="timeout")
    assert plan(w.view, t(4)) == []
    assert w.rejections == []


def test_a_transfer_is_credited_and_leaves_nothing_in_flight() -> None:
    w = World()
    w.send(ac.GrantTokens(account_id=TREASURY, to="alice", amount=50, at=t(0)))
    assert w.totals().in_flight == 50 and w.totals().balanced
    w.settle(t(0))
    w.send(ac.TransferTokens(account_id="alice", to="bob", amount=20, at=t(1)))
    w.settle(t(1))
    assert (w.account("alice").balance, w.account("bob").balance) == (30, 20)
    assert w.totals().in_flight == 0 and w.totals().balanced


def test_a_credit_read_before_its_debit_settles_it() -> None:
    w = World()
    out = w.send(ac.GrantTokens(account_id=TREASURY, to="alice", amount=50, at=t(0)))
    assert isinstance(out, list)
    w.settle(t(0))
    credit = w.log[-1]
    view = EconomyView()
    apply(view, credit)  # the account topic's partition was read first
    for stored in out:
        apply(view, stored)
    assert plan(view, t(1)) == []


def governed(w: World, votes: dict[str, str], window: int = 60) -> None:
    powers = tuple(
        pr.VoterPower(account_id=a, power=p) for a, p in (("a", 600), ("b", 300), ("c", 100))
    )
    w.send(
        pr.CreateProposal(
            proposal_id="p1",
            title="t",
            proposer="a",
            change=ParameterChange(base_reward=20 * MICRO),
            window_s=window,
            quorum_bp=5_000,
            threshold_bp=5_000,
            powers=powers,
            at=t(0),
        )
    )
    for voter, choice in votes.items():
        w.send(pr.CastVote(proposal_id="p1", voter=voter, choice=choice, at=t(1)))  # type: ignore[arg-type]


def test_governance_closes_at_the_deadline_and_executes_a_passed_proposal() -> None:
    w = World()
    governed(w, {"a": "for"})
    assert w.settle(t(59)) == 0
    w.settle(t(60))
    assert w.states[("proposal", "p1")].status == "executed"
    assert w.view.params.base_reward == 20 * MICRO
    # Rewards from then on use the new base.
    w.agent_with_stake("a1", 1)
    w.run_task("t1", "a1")
    w.settle(t(61))
    assert w.account("a1").earned == 20 * MICRO


def test_governance_rejected_and_quorum_missed_change_nothing() -> None:
    for votes, outcome in (
        ({"a": "against", "b": "for"}, "rejected"),
        ({"c": "for"}, "quorum_missed"),
    ):
        w = World()
        governed(w, votes)
        w.settle(t(61))
        assert w.states[("proposal", "p1")].status == outcome
        assert w.view.params == EconomyParameters()


def test_planning_since_a_position_plans_only_what_came_due_after_it() -> None:
    w = World()
    for i in range(3):
        w.send(ac.GrantTokens(account_id=TREASURY, to=f"h{i}", amount=MICRO, at=t(0)))
    first = w.view.seq
    w.send(ac.GrantTokens(account_id=TREASURY, to="h3", amount=MICRO, at=t(0)))
    everything = plan(w.view, t(1))
    assert [p.command.account_id for p in everything] == ["h0", "h1", "h2", "h3"]
    assert plan(w.view, t(1), since=first) == everything[3:]
    assert plan(w.view, t(1), since=w.view.seq) == []
    # A settled credit leaves the queue; the rest keep their order and their numbers.
    w.send(everything[1].command, everything[1].command_id)
    assert plan(w.view, t(1), since=first - 2) == [everything[2], everything[3]]

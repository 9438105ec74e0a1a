"""The economy process manager: rewards, slashing, ledger credits, governance timers.

Pure, like streams/scheduler.py: ``apply`` folds agent, task, account and proposal
events into an ``EconomyView``, and ``plan(view, now)`` returns every command the
economy needs now. It is level-triggered: what is *due* is kept in the view until
the event that settles it is read, so a restarted runner that refolds the log sends
only what is still owed, and sends it with the same id as before.

What it sends (every id is ``derived_id(purpose, causing event id)``, so a replayed
event, a resend or a second copy of the runner produces the same command id, and the
command processor drops the repeat: a reward is paid once):

- ``TaskCompleted`` -> ``PayReward`` from the treasury to the agent (id from the
  completion's event id). The amount is decided when the completion is folded, from
  the parameters in force and the agent's tier then (domain/economy.reward_amount:
  ``base x multiplier x quality``, rounded down to the micro-token). Settled by the
  treasury's ``TransferSent`` whose ``cause`` is that event id. A zero reward sends
  nothing.
- ``TaskRequeued``/``TaskTimedOut`` of a task the agent had *started* -> ``SlashStake``
  at the governed slash rate (settled by ``StakeSlashed`` with that cause; not owed
  when the agent's stake would slash to nothing, and not sent while it would).
- every debit (``TransferSent``, ``StakeSlashed``) -> the credit on its destination
  (``ReceiveTransfer``, or ``AccrueReward`` for a reward), settled by the credit whose
  ``transfer_id`` is the debit's event id.
- ``AgentRegistered`` -> ``OpenAccount`` for the agent (settled by ``AccountOpened``).
- an open proposal past its deadline -> ``CloseProposal``; a passed one ->
  ``ExecuteProposal`` (both expect the proposal version they were planned on).
  ``ProposalExecuted`` changes ``view.params``, which the reward and slash policies
  read from then on.

Topics are read independently, so a settling event may be read before the event it
settles: the ``*_settled`` sets remember such early settlements until their cause
arrives (then both are forgotten).
"""

from __future__ import annotations

import functools
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from domain import account as ac
from domain import agent as ag
from domain import proposal as pr
from domain import task as tk
from domain.economy import TREASURY, EconomyParameters, Tier, reward_amount, slash_amount
from domain.ids import derived_id
from domain.messages import Command
from domain.recorded import RecordedEvent
from streams.unbuilt import Unbuilt, build

# A pending reward or credit is planned again on every tick until its event arrives, and
# uuid5 is most of a tick's cost under load: remember the ids (one string per cause).
_id = functools.lru_cache(maxsize=1 << 20)(derived_id)


@dataclass
class Debit:
    """A debit waiting for its credit (micro-tokens)."""

    source: str
    to: str
    amount: int
    kind: ac.TransferKind
    task_id: str | None
    seq: int = 0


@dataclass
class RewardDue:
    """A reward owed for a completed task (micro-tokens)."""

    agent_id: str
    task_id: str
    amount: int
    seq: int = 0


@dataclass
class SlashDue:
    """A slash owed for a task the agent lost after starting it."""

    agent_id: str
    task_id: str
    rate_bp: int
    seq: int = 0


@dataclass
class ProposalView:
    """What the governance timer needs of one proposal."""

    closes_at: datetime
    status: str
    version: int


@dataclass
class EconomyView:
    """Everything the economy process manager has folded (see the module docstring)."""

    params: EconomyParameters = field(default_factory=EconomyParameters)
    staked: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, Tier] = field(default_factory=dict)
    opened: set[str] = field(default_factory=set)
    started: dict[str, str] = field(default_factory=dict)  # task id -> agent running it
    rewards: dict[str, RewardDue] = field(default_factory=dict)  # by cause event id
    rewards_settled: set[str] = field(default_factory=set)
    slashes: dict[str, SlashDue] = field(default_factory=dict)
    slashes_settled: set[str] = field(default_factory=set)
    debits: dict[str, Debit] = field(default_factory=dict)  # by debit event id
    credits_settled: set[str] = field(default_factory=set)
    accounts_due: set[str] = field(default_factory=set)
    proposals: dict[str, ProposalView] = field(default_factory=dict)
    seq: int = 0  # how many rewards, slashes and debits have come due (see ``plan``'s since)


@dataclass(frozen=True)
class Planned:
    """A command to send with its deterministic id (and the version it expects, if any)."""

    command_id: str
    command: Command
    expected_version: int | None = None


class _Numbered(Protocol):
    """Something that comes due: numbered by ``_due`` so ``plan(since=...)`` can skip."""

    seq: int


N = TypeVar("N", bound=_Numbered)


def _due(view: EconomyView, due: dict[str, N], settled: set[str], key: str, value: N) -> None:
    if key in settled:
        settled.discard(key)
    else:
        # Numbered, and at the end of ``due`` (which is therefore in ``seq`` order), so
        # that ``plan(since=...)`` reads only what came due since.
        view.seq += 1
        value.seq = view.seq
        due.pop(key, None)
        due[key] = value


def _settle(due: dict[str, N], settled: set[str], key: str | None) -> None:
    if key is None:
        return
    if due.pop(key, None) is None:
        settled.add(key)


def apply(view: EconomyView, stored: RecordedEvent) -> None:
    """Fold one stored event into ``view`` (in place; no IO)."""
    e = stored.event
    match e:
        case ag.AgentRegistered():
            if e.agent_id not in view.opened:
                view.accounts_due.add(e.agent_id)
        case tk.TaskStarted():
            view.started[e.task_id] = e.agent_id
        case tk.TaskCompleted():
            view.started.pop(e.task_id, None)
            amount = reward_amount(view.params, view.tiers.get(e.agent_id, "none"), e.quality)
            if amount > 0:
                _due(
                    view,
                    view.rewards,
                    view.rewards_settled,
                    stored.id,
                    RewardDue(e.agent_id, e.task_id, amount),
                )
        case tk.TaskRequeued() | tk.TaskTimedOut():
            rate = view.params.slash_rate_bp
            staked = view.staked.get(e.agent_id, 0)
            if view.started.pop(e.task_id, None) == e.agent_id and slash_amount(staked, rate) > 0:
                _due(
                    view,
                    view.slashes,
                    view.slashes_settled,
                    stored.id,
                    SlashDue(e.agent_id, e.task_id, rate),
                )
        case tk.TaskQueued() | tk.TaskFailed() | tk.TaskCancelled() | tk.TaskDeadLettered():
            view.started.pop(e.task_id, None)
        case ac.AccountOpened():
            view.opened.add(e.account_id)
            view.accounts_due.discard(e.account_id)
        case ac.TokensStaked():
            view.staked[e.account_id] = view.staked.get(e.account_id, 0) + e.amount
        case ac.UnstakeRequested():
            view.staked[e.account_id] = view.staked.get(e.account_id, 0) - e.amount
        case ac.TierChanged():
            view.tiers[e.account_id] = e.tier
        case ac.TransferSent():
            _due(
                view,
                view.debits,
                view.credits_settled,
                stored.id,
                Debit(e.account_id, e.to, e.amount, e.kind, e.task_id),
            )
            if e.kind == "reward":
                _settle(view.rewards, view.rewards_settled, e.cause)
        case ac.StakeSlashed():
            view.staked[e.account_id] = view.staked.get(e.account_id, 0) - e.amount
            _due(
                view,
                view.debits,
                view.credits_settled,
                stored.id,
                Debit(e.account_id, e.to, e.amount, "slash", e.task_id),
            )
            _settle(view.slashes, view.slashes_settled, e.cause)
        case ac.TransferReceived() | ac.RewardAccrued():
            _settle(view.debits, view.credits_settled, e.transfer_id)
        case pr.ProposalCreated():
            view.proposals[e.proposal_id] = ProposalView(e.closes_at, "open", stored.version)
        case pr.VoteCast() | pr.ProposalClosed() | pr.ProposalExecuted():
            p = view.proposals.get(e.proposal_id)
            if p is not None:
                p.version = stored.version
                if isinstance(e, pr.ProposalClosed):
                    p.status = e.outcome
                elif isinstance(e, pr.ProposalExecuted):
                    p.status = "executed"
            if isinstance(e, pr.ProposalExecuted):
                view.params = e.change.applied_to(view.params)


def _since(due: dict[str, N], since: int) -> list[tuple[str, N]]:
    """The items of ``due`` (in ``seq`` order, see ``_due``) numbered above ``since``."""
    if not since:
        return list(due.items())
    newer: list[tuple[str, N]] = []
    for key in reversed(due):
        item = due[key]
        if item.seq <= since:
            break
        newer.append((key, item))
    newer.reverse()
    return newer


def plan(
    view: EconomyView,
    now: datetime,
    skip: Container[str] = (),
    since: int = 0,
    failures: list[Unbuilt] | None = None,
) -> list[Planned]:
    """Every command the economy owes at ``now`` (see the module docstring), except those
    whose command id is in ``skip`` (sent already and not yet due again: the runner
    passes its in-flight ids, so a long backlog is not rebuilt on every tick).

    With ``since`` (a ``view.seq`` the caller planned at before), only the rewards,
    slashes and credits that came due after it are planned (account openings and
    proposal timers are always planned in full): a runner with a backlog of thousands
    of credits in flight reads only the new ones on each tick, and plans in full (since
    0) when it may need to send something again.

    With ``failures`` a list, a command that cannot be built is appended to it and left
    out (streams/unbuilt.py); the runner then passes its id in ``skip``.
    """
    out: list[Planned] = []
    for agent_id in sorted(view.accounts_due):
        cid = _id("open-account", agent_id)
        if cid in skip:
            continue
        opening = build(failures, cid, ac.OpenAccount, account_id=agent_id, holder="agent", at=now)
        if opening is not None:
            out.append(Planned(cid, opening))
    for cause, r in _since(view.rewards, since):
        cid = _id("reward", cause)
        if cid in skip:
            continue
        reward = build(
            failures,
            cid,
            ac.PayReward,
            account_id=TREASURY,
            to=r.agent_id,
            amount=r.amount,
            task_id=r.task_id,
            cause=cause,
            at=now,
        )
        if reward is not None:
            out.append(Planned(cid, reward))
    for cause, s in _since(view.slashes, since):
        if slash_amount(view.staked.get(s.agent_id, 0), s.rate_bp) == 0:
            continue  # unstaked since: the decider would refuse it
        cid = _id("slash", cause)
        if cid in skip:
            continue
        slash = build(
            failures,
            cid,
            ac.SlashStake,
            account_id=s.agent_id,
            rate_bp=s.rate_bp,
            task_id=s.task_id,
            cause=cause,
            at=now,
        )
        if slash is not None:
            out.append(Planned(cid, slash))
    for debit_id, d in _since(view.debits, since):
        cid = _id("credit", debit_id)
        if cid in skip:
            continue
        credit = build(
            failures,
            cid,
            ac.AccrueReward if d.kind == "reward" else ac.ReceiveTransfer,
            account_id=d.to,
            transfer_id=debit_id,
            from_account=d.source,
            amount=d.amount,
            kind=d.kind,
            task_id=d.task_id,
            at=now,
        )
        if credit is not None:
            out.append(Planned(cid, credit))
    timer: type[pr.CloseProposal | pr.ExecuteProposal]
    for pid, p in view.proposals.items():
        if p.status == "open" and now >= p.closes_at:
            cid, timer = _id("close", pid, p.version), pr.CloseProposal
        elif p.status == "passed":
            cid, timer = _id("execute", pid, p.version), pr.ExecuteProposal
        else:
            continue
        if cid in skip:
            continue
        command = build(failures, cid, timer, proposal_id=pid, at=now)
        if command is not None:
            out.append(Planned(cid, command, p.version))
    return out

"""The Proposal aggregate: stake-weighted governance of the economy's parameters.

Lifecycle: created (open) -> closed (passed | rejected | quorum_missed) -> executed
(passed ones only).

Voting power is the voter's stake *at the proposal's creation*: ``CreateProposal``
carries that snapshot (``powers``, looked up by the API from the accounts read model),
so the aggregate itself knows every voter's power and stake moved afterwards cannot
change it. Rules, in integers (basis points, 10,000 = 100 %):

- quorum: ``(for + against + abstain) * 10_000 >= quorum_bp * total_power`` (and at
  least one vote), else ``quorum_missed``;
- pass: ``for * 10_000 > threshold_bp * (for + against)`` (strictly more than the
  threshold share of the decisive votes; abstentions count only towards quorum).

Votes are accepted while ``at < closes_at``; ``CloseProposal`` is accepted from
``closes_at`` on (the governance timer in streams/ sends it).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from domain.economy import BP, ParameterChange
from domain.messages import Command, Decider, Event, Message, Rejection, rejected
from domain.money import MicroTokens

PROPOSAL = "proposal"

Choice = Literal["for", "against", "abstain"]
Outcome = Literal["passed", "rejected", "quorum_missed"]
Status = Literal["open", "passed", "rejected", "quorum_missed", "executed"]


class VoterPower(Message):
    """One account's voting power (its stake at creation, micro-tokens)."""

    account_id: str = Field(min_length=1)
    power: int = Field(ge=0)


class ProposalCommand(Command):
    """A command addressed to one Proposal aggregate, keyed by ``proposal_id``."""

    aggregate_type: ClassVar[str] = PROPOSAL
    id_field: ClassVar[str] = "proposal_id"
    proposal_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")


# The fields of ``CreateProposal``, declared once: the command and the HTTP API's request
# body (api/schemas/proposals.py) both use them, so a bound or default cannot drift.

ProposalTitle = Annotated[str, Field(min_length=1, max_length=200)]
"""A proposal's title."""

WindowS = Annotated[int, Field(gt=0, le=90 * 86_400)]
"""How long voting runs, in seconds (at most 90 days)."""

QuorumBp = Annotated[int, Field(ge=0, le=BP)]
"""The share of the total power that must vote, in basis points."""
DEFAULT_QUORUM_BP = 2_000

ThresholdBp = Annotated[int, Field(ge=0, lt=BP)]
"""The share of the decisive votes (for + against) that "for" must exceed, in basis points."""
DEFAULT_THRESHOLD_BP = 5_000


class CreateProposal(ProposalCommand):
    """Propose ``change``; voting runs ``window_s`` seconds from ``at``.

    ``powers`` is the snapshot of every staker's stake at creation.
    """

    title: ProposalTitle
    proposer: str = Field(min_length=1, max_length=128)
    change: ParameterChange
    window_s: WindowS
    quorum_bp: QuorumBp = DEFAULT_QUORUM_BP
    threshold_bp: ThresholdBp = DEFAULT_THRESHOLD_BP
    powers: tuple[VoterPower, ...] = ()

    @field_validator("powers")
    @classmethod
    def _unique(cls, value: tuple[VoterPower, ...]) -> tuple[VoterPower, ...]:
        if len({p.account_id for p in value}) != len(value):
            raise ValueError("one power per account")
        return value


class CastVote(ProposalCommand):
    """``voter`` votes ``choice``, with the power it had at the proposal's creation."""

    voter: str = Field(min_length=1, max_length=128)
    choice: Choice


class CloseProposal(ProposalCommand):
    """Close voting (from the deadline on) and count."""


class ExecuteProposal(ProposalCommand):
    """Put a passed proposal's change in force."""


class ProposalEvent(Event):
    """An event of one Proposal aggregate."""

    aggregate_type: ClassVar[str] = PROPOSAL
    proposal_id: str


class ProposalCreated(ProposalEvent):
    """A proposal was created, open for votes until ``closes_at``."""

    event_type: ClassVar[str] = "created"
    title: str
    proposer: str
    change: ParameterChange
    opened_at: datetime
    closes_at: datetime
    quorum_bp: int
    threshold_bp: int
    powers: tuple[VoterPower, ...]
    total_power: int


class VoteCast(ProposalEvent):
    """``voter`` voted ``choice`` with ``power``."""

    event_type: ClassVar[str] = "vote_cast"
    voter: str
    choice: Choice
    power: int


class ProposalClosed(ProposalEvent):
    """Voting closed with ``outcome`` and the tallies (micro-tokens of stake)."""

    event_type: ClassVar[str] = "closed"
    outcome: Outcome
    votes_for: int
    votes_against: int
    votes_abstain: int
    total_power: int


class ProposalExecuted(ProposalEvent):
    """The change is in force from this event on."""

    event_type: ClassVar[str] = "executed"
    change: ParameterChange


class ProposalState(Message):
    """The write-side state of one proposal."""

    proposal_id: str
    change: ParameterChange
    closes_at: datetime
    quorum_bp: int
    threshold_bp: int
    powers: dict[str, int]
    total_power: MicroTokens
    status: Status = "open"
    votes: dict[str, Choice] = Field(default_factory=dict)
    tally: dict[str, int] = Field(default_factory=lambda: {"for": 0, "against": 0, "abstain": 0})


def outcome_of(
    tally: dict[str, int], total_power: int, quorum_bp: int, threshold_bp: int
) -> Outcome:
    """The outcome of ``tally`` (see the module docstring)."""
    cast = tally["for"] + tally["against"] + tally["abstain"]
    if cast == 0 or cast * BP < quorum_bp * total_power:
        return "quorum_missed"
    decisive = tally["for"] + tally["against"]
    if decisive > 0 and tally["for"] * BP > threshold_bp * decisive:
        return "passed"
    return "rejected"


def decide(
    command: ProposalCommand, state: ProposalState | None
) -> list[ProposalEvent] | Rejection:
    """Decide the events for ``command`` given the proposal's ``state`` (None: none yet).

    Rejections: ``proposal_not_found`` (not_found); ``proposal_already_exists``,
    ``voting_closed``, ``already_voted``, ``voting_still_open``, ``proposal_closed``,
    ``proposal_not_passed``, ``proposal_already_executed`` (conflict);
    ``no_voting_power`` (forbidden, field voter); ``empty_change`` (invalid, field change).
    """
    pid = command.proposal_id
    match command, state:
        case CreateProposal(), None:
            if command.change.is_empty():
                return rejected(
                    "invalid", "empty_change", "the change changes nothing", field="change"
                )
            return [
                ProposalCreated(
                    proposal_id=pid,
                    title=command.title,
                    proposer=command.proposer,
                    change=command.change,
                    opened_at=command.at,
                    closes_at=command.at + timedelta(seconds=command.window_s),
                    quorum_bp=command.quorum_bp,
                    threshold_bp=command.threshold_bp,
                    powers=command.powers,
                    total_power=sum(p.power for p in command.powers),
                )
            ]
        case CreateProposal(), ProposalState():
            return rejected("conflict", "proposal_already_exists", f"proposal {pid} exists")
        case _, None:
            return rejected("not_found", "proposal_not_found", f"no proposal {pid}")
        case CastVote(), ProposalState(status="open"):
            if command.at >= state.closes_at:
                return rejected("conflict", "voting_closed", f"voting on {pid} closed")
            if command.voter in state.votes:
                return rejected(
                    "conflict", "already_voted", f"{command.voter} has voted", field="voter"
                )
            power = state.powers.get(command.voter, 0)
            if power <= 0:
                return rejected(
                    "forbidden",
                    "no_voting_power",
                    f"{command.voter} had no stake when {pid} was created",
                    field="voter",
                )
            return [
                VoteCast(proposal_id=pid, voter=command.voter, choice=command.choice, power=power)
            ]
        case CastVote(), ProposalState():
            return rejected("conflict", "voting_closed", f"proposal {pid} is {state.status}")
        case CloseProposal(), ProposalState(status="open"):
            if command.at < state.closes_at:
                return rejected(
                    "conflict",
                    "voting_still_open",
                    f"voting on {pid} closes at {state.closes_at.isoformat()}",
                )
            return [
                ProposalClosed(
                    proposal_id=pid,
                    outcome=outcome_of(
                        state.tally, state.total_power, state.quorum_bp, state.threshold_bp
                    ),
                    votes_for=state.tally["for"],
                    votes_against=state.tally["against"],
                    votes_abstain=state.tally["abstain"],
                    total_power=state.total_power,
                )
            ]
        case CloseProposal(), ProposalState():
            return rejected("conflict", "proposal_closed", f"proposal {pid} is {state.status}")
        case ExecuteProposal(), ProposalState(status="passed"):
            return [ProposalExecuted(proposal_id=pid, change=state.change)]
        case ExecuteProposal(), ProposalState(status="executed"):
            return rejected("conflict", "proposal_already_executed", f"proposal {pid} was executed")
        case ExecuteProposal(), ProposalState():
            return rejected("conflict", "proposal_not_passed", f"proposal {pid} is {state.status}")
    return rejected("invalid", "unknown_command", f"not a proposal command: {command!r}")


def evolve(state: ProposalState | None, event: ProposalEvent) -> ProposalState | None:
    """Apply ``event`` to ``state``; never raises, never checks rules."""
    if isinstance(event, ProposalCreated):
        return ProposalState(
            proposal_id=event.proposal_id,
            change=event.change,
            closes_at=event.closes_at,
            quorum_bp=event.quorum_bp,
            threshold_bp=event.threshold_bp,
            powers={p.account_id: p.power for p in event.powers},
            total_power=event.total_power,
        )
    if state is None:
        return None
    match event:
        case VoteCast():
            tally = dict(state.tally)
            tally[event.choice] = tally.get(event.choice, 0) + event.power
            return state.model_copy(
                update={"votes": {**state.votes, event.voter: event.choice}, "tally": tally}
            )
        case ProposalClosed():
            return state.model_copy(update={"status": event.outcome})
        case ProposalExecuted():
            return state.model_copy(update={"status": "executed"})
    return state


PROPOSAL_DECIDER: Decider[ProposalCommand, ProposalState, ProposalEvent] = Decider(
    aggregate_type=PROPOSAL,
    command_types=(CreateProposal, CastVote, CloseProposal, ExecuteProposal),
    event_types=(ProposalCreated, VoteCast, ProposalClosed, ProposalExecuted),
    decide=decide,
    evolve=evolve,
)

"""Economy views: account rows fold like the decider's state, ledger legs balance, and
proposal rows keep their tallies; events at or below a row's version change nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from domain import account as ac
from domain import proposal as pr
from domain.economy import TREASURY, ParameterChange
from domain.messages import Event
from domain.recorded import RecordedEvent
from projections.views import evolve_account, evolve_proposal, ledger_legs

T = datetime(2026, 1, 1, tzinfo=UTC)


def stored(agg: str, aid: str, version: int, event: Event) -> RecordedEvent:
    return RecordedEvent(
        id=f"{aid}-{version}",
        aggregate_type=agg,
        aggregate_id=aid,
        version=version,
        time=T,
        correlation_id="c",
        causation_id="cmd",
        event=event,
    )


HISTORY = [
    ac.AccountOpened(account_id="a", holder="agent"),
    ac.TransferReceived(
        account_id="a", transfer_id="x", from_account=TREASURY, amount=900, kind="grant"
    ),
    ac.TokensStaked(account_id="a", amount=600),
    ac.UnstakeRequested(account_id="a", amount=100, available_at=T),
    ac.StakeSlashed(account_id="a", amount=50, rate_bp=1000, task_id="t"),
    ac.RewardAccrued(account_id="a", transfer_id="y", from_account=TREASURY, amount=7),
    ac.TokensUnstaked(account_id="a", amount=100),
    ac.TransferSent(account_id="a", to="b", amount=5, kind="transfer"),
]


def test_account_row_matches_the_decider_state() -> None:
    row: dict[str, Any] | None = None
    for i, e in enumerate(HISTORY, 1):
        row = evolve_account(row, stored("account", "a", i, e))
    state = ac.ACCOUNT_DECIDER.fold(HISTORY)
    assert row is not None and state is not None
    assert (row["balance"], row["staked"], row["unstaking"], row["earned"], row["slashed"]) == (
        state.balance,
        state.staked,
        state.unstaking_total,
        state.earned,
        state.slashed,
    )
    assert row["version"] == len(HISTORY)
    again = evolve_account(row, stored("account", "a", 3, HISTORY[2]))
    assert again is row


def test_every_event_s_legs_sum_to_zero_and_name_their_cause() -> None:
    events = [*HISTORY, ac.TokensMinted(account_id=TREASURY, amount=10)]
    for i, e in enumerate(events, 1):
        legs = ledger_legs(stored("account", e.account_id, i, e))
        assert sum(leg["amount"] for leg in legs) == 0
    legs = ledger_legs(stored("account", "a", 5, HISTORY[4]))
    assert {leg["task_id"] for leg in legs} == {"t"}
    assert ledger_legs(stored("account", "a", 1, HISTORY[0])) == []


def test_proposal_row_tallies_votes_and_follows_the_outcome() -> None:
    created = pr.ProposalCreated(
        proposal_id="p",
        title="t",
        proposer="a",
        change=ParameterChange(slash_rate_bp=5),
        opened_at=T,
        closes_at=T,
        quorum_bp=0,
        threshold_bp=5000,
        powers=(pr.VoterPower(account_id="a", power=3),),
        total_power=3,
    )
    row = evolve_proposal(None, stored("proposal", "p", 1, created))
    row = evolve_proposal(
        row,
        stored("proposal", "p", 2, pr.VoteCast(proposal_id="p", voter="a", choice="for", power=3)),
    )
    row = evolve_proposal(
        row,
        stored("proposal", "p", 2, pr.VoteCast(proposal_id="p", voter="a", choice="for", power=3)),
    )
    assert row is not None and (row["votes_for"], row["voters"]) == (3, 1)
    row = evolve_proposal(
        row,
        stored(
            "proposal",
            "p",
            3,
            pr.ProposalClosed(
                proposal_id="p",
                outcome="passed",
                votes_for=3,
                votes_against=0,
                votes_abstain=0,
                total_power=3,
            ),
        ),
    )
    assert row is not None and row["status"] == "passed" and row["change"] == {"slash_rate_bp": 5}

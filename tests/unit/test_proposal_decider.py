"""The Proposal decider, given/when/then: every command and every rejection code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from domain.economy import EconomyParameters, ParameterChange
from domain.messages import MICRO
from domain.proposal import (
    PROPOSAL_DECIDER,
    CastVote,
    CloseProposal,
    CreateProposal,
    ExecuteProposal,
    ProposalClosed,
    ProposalCreated,
    ProposalExecuted,
    VoteCast,
    VoterPower,
    outcome_of,
)
from tests.unit.gwt import given

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
P = "prop-1"
CHANGE = ParameterChange(base_reward=20 * MICRO)
POWERS = (
    VoterPower(account_id="a", power=600),
    VoterPower(account_id="b", power=300),
    VoterPower(account_id="c", power=100),
)


def at(seconds: float = 0) -> datetime:
    return T0 + timedelta(seconds=seconds)


create = CreateProposal(
    proposal_id=P,
    title="double the base",
    proposer="a",
    change=CHANGE,
    window_s=60,
    quorum_bp=5_000,
    threshold_bp=5_000,
    powers=POWERS,
    at=at(),
)
created = ProposalCreated(
    proposal_id=P,
    title="double the base",
    proposer="a",
    change=CHANGE,
    opened_at=at(),
    closes_at=at(60),
    quorum_bp=5_000,
    threshold_bp=5_000,
    powers=POWERS,
    total_power=1_000,
)


def vote(voter: str, choice: str, power: int) -> VoteCast:
    return VoteCast(proposal_id=P, voter=voter, choice=choice, power=power)  # type: ignore[arg-type]


def test_creates_a_proposal_with_the_stake_snapshot() -> None:
    given(PROPOSAL_DECIDER).when(create).then(created).and_state(status="open", total_power=1_000)


def test_a_second_create_is_rejected() -> None:
    given(PROPOSAL_DECIDER, created).when(create).then_rejected(
        "proposal_already_exists", kind="conflict"
    )


def test_an_empty_change_is_rejected() -> None:
    given(PROPOSAL_DECIDER).when(
        create.model_copy(update={"change": ParameterChange()})
    ).then_rejected("empty_change", kind="invalid", field="change")


def test_commands_on_a_missing_proposal_are_not_found() -> None:
    for command in (
        CastVote(proposal_id=P, voter="a", choice="for", at=at()),
        CloseProposal(proposal_id=P, at=at()),
        ExecuteProposal(proposal_id=P, at=at()),
    ):
        given(PROPOSAL_DECIDER).when(command).then_rejected("proposal_not_found", kind="not_found")


def test_a_vote_carries_the_power_at_creation() -> None:
    given(PROPOSAL_DECIDER, created).when(
        CastVote(proposal_id=P, voter="b", choice="against", at=at(1))
    ).then(vote("b", "against", 300))


def test_a_second_vote_is_rejected() -> None:
    given(PROPOSAL_DECIDER, created, vote("a", "for", 600)).when(
        CastVote(proposal_id=P, voter="a", choice="against", at=at(2))
    ).then_rejected("already_voted", kind="conflict", field="voter")


def test_a_voter_without_stake_at_creation_has_no_power() -> None:
    given(PROPOSAL_DECIDER, created).when(
        CastVote(proposal_id=P, voter="zed", choice="for", at=at(1))
    ).then_rejected("no_voting_power", kind="forbidden", field="voter")


def test_votes_after_the_deadline_are_rejected() -> None:
    given(PROPOSAL_DECIDER, created).when(
        CastVote(proposal_id=P, voter="a", choice="for", at=at(60))
    ).then_rejected("voting_closed", kind="conflict")


def test_close_before_the_deadline_is_rejected() -> None:
    given(PROPOSAL_DECIDER, created).when(CloseProposal(proposal_id=P, at=at(59))).then_rejected(
        "voting_still_open", kind="conflict"
    )


def closed(outcome: str, f: int, a: int, ab: int) -> ProposalClosed:
    return ProposalClosed(
        proposal_id=P,
        outcome=outcome,
        votes_for=f,
        votes_against=a,
        votes_abstain=ab,  # type: ignore[arg-type]
        total_power=1_000,
    )


def test_closes_passed_with_quorum_and_majority() -> None:
    given(PROPOSAL_DECIDER, created, vote("a", "for", 600)).when(
        CloseProposal(proposal_id=P, at=at(60))
    ).then(closed("passed", 600, 0, 0)).and_state(status="passed")


def test_closes_rejected_without_majority() -> None:
    given(PROPOSAL_DECIDER, created, vote("a", "against", 600), vote("b", "for", 300)).when(
        CloseProposal(proposal_id=P, at=at(61))
    ).then(closed("rejected", 300, 600, 0))


def test_closes_with_quorum_missed() -> None:
    given(PROPOSAL_DECIDER, created, vote("b", "for", 300), vote("c", "abstain", 100)).when(
        CloseProposal(proposal_id=P, at=at(61))
    ).then(closed("quorum_missed", 300, 0, 100))


def test_a_closed_proposal_takes_no_votes_and_no_second_close() -> None:
    g = given(PROPOSAL_DECIDER, created, closed("quorum_missed", 0, 0, 0))
    g.when(CastVote(proposal_id=P, voter="a", choice="for", at=at(1))).then_rejected(
        "voting_closed"
    )
    g.when(CloseProposal(proposal_id=P, at=at(70))).then_rejected("proposal_closed")


def test_executes_a_passed_proposal_once() -> None:
    passed = (created, vote("a", "for", 600), closed("passed", 600, 0, 0))
    given(PROPOSAL_DECIDER, *passed).when(ExecuteProposal(proposal_id=P, at=at(61))).then(
        ProposalExecuted(proposal_id=P, change=CHANGE)
    ).and_state(status="executed")
    given(PROPOSAL_DECIDER, *passed, ProposalExecuted(proposal_id=P, change=CHANGE)).when(
        ExecuteProposal(proposal_id=P, at=at(62))
    ).then_rejected("proposal_already_executed", kind="conflict")


def test_a_proposal_not_passed_is_not_executed() -> None:
    for history in ((created,), (created, closed("rejected", 0, 600, 0))):
        given(PROPOSAL_DECIDER, *history).when(
            ExecuteProposal(proposal_id=P, at=at(61))
        ).then_rejected("proposal_not_passed", kind="conflict")


def test_the_threshold_is_strict_and_abstentions_only_count_to_quorum() -> None:
    assert outcome_of({"for": 500, "against": 500, "abstain": 0}, 1000, 5000, 5000) == "rejected"
    assert outcome_of({"for": 501, "against": 500, "abstain": 0}, 1000, 5000, 5000) == "passed"
    assert outcome_of({"for": 0, "against": 0, "abstain": 1000}, 1000, 5000, 5000) == "rejected"
    assert outcome_of({"for": 0, "against": 0, "abstain": 0}, 0, 0, 5000) == "quorum_missed"


def test_duplicate_powers_are_invalid() -> None:
    with pytest.raises(ValidationError):
        create.model_validate({**create.model_dump(), "powers": [POWERS[0], POWERS[0]]})


def test_a_change_applies_only_the_fields_it_sets() -> None:
    params = ParameterChange(slash_rate_bp=250).applied_to(EconomyParameters())
    assert params.slash_rate_bp == 250 and params.base_reward == EconomyParameters().base_reward

"""Money at the API is derived from one declared type, ``domain.money.MicroTokens``: the
OpenAPI document declares every token amount a string, a response field is a token
string because of its type, and a command's answer shows an aggregate state's money by
the ``MicroTokens`` fields of its domain model, never by a field's name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from api.app import create_app
from api.schemas.accounts import AccountPublic, LedgerEntryPublic
from api.schemas.commands import STATE_TYPES
from api.schemas.economy import LeaderboardEntry
from api.schemas.money import TokenString, format_tokens, public_state
from domain.account import ACCOUNT, ACCOUNT_DECIDER, OpenAccount, RequestUnstake, StakeTokens
from domain.account import TransferReceived as Received
from domain.agent import AGENT, AGENT_DECIDER, RegisterAgent
from domain.economy import TREASURY, EconomyParameters, ParameterChange
from domain.messages import MICRO, Command, Decider, Rejection
from domain.money import MicroTokens, is_micro_tokens
from domain.proposal import PROPOSAL, PROPOSAL_DECIDER, CreateProposal, VoterPower
from domain.task import TASK, TASK_DECIDER, SubmitTask

AT = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def _state(decider: Decider[Any, Any, Any], *steps: Command | BaseModel) -> dict[str, Any]:
    """The JSON summary (as a command outcome carries it) after deciding each command of
    ``steps`` and folding each event of it."""
    state = decider.initial_state
    for step in steps:
        if isinstance(step, Command):
            events = decider.decide(step, state)
            assert not isinstance(events, Rejection), events
        else:
            events = [step]
        state = decider.fold(events, state)
    summary = decider.summary(state)
    assert summary is not None
    return summary


def test_the_openapi_document_declares_token_amounts_as_strings() -> None:
    schemas = create_app().openapi()["components"]["schemas"]

    def field(model: str, name: str) -> dict[str, Any]:
        schema: dict[str, Any] = schemas[model]["properties"][name]
        return schema

    for model, name in [
        ("AccountPublic", "balance"),
        ("AccountPublic", "staked"),
        ("AccountPublic", "supply"),
        ("PendingUnstakePublic", "amount"),
        ("LedgerEntryPublic", "amount"),
        ("LeaderboardEntry", "earned"),
        ("EconomySummary", "in_flight"),
        ("TierSummary", "staked"),
        ("FlowSummary", "amount"),
        ("AgentPublic", "cost_per_task"),
        ("ProposalPublic", "total_power"),
        ("VotePublic", "power"),
        ("Grant", "amount"),
        ("AgentCreate", "cost_per_task"),
    ]:
        assert field(model, name)["type"] == "string", (model, name)
    assert {"type": "string"} in field("TaskPublic", "max_cost")["anyOf"]
    assert {"type": "integer"} not in field("TaskPublic", "max_cost")["anyOf"]


def test_a_token_string_field_holds_micro_tokens_and_writes_tokens() -> None:
    entry = LeaderboardEntry(rank=1, account_id="a", earned=1_500_000)
    assert entry.earned == 1_500_000
    assert entry.model_dump(mode="json")["earned"] == "1.500000"
    assert LedgerEntryPublic.model_fields["amount"].metadata  # the serializer is on the type
    assert format_tokens(-250_000) == "-0.250000"
    assert format_tokens(0) == "0.000000"


def test_an_integer_named_amount_is_money_only_when_typed_so() -> None:
    class Counted(BaseModel):
        amount: int
        paid: MicroTokens

    class CountedPublic(BaseModel):
        amount: int
        paid: TokenString

    assert public_state(Counted, {"amount": 3, "paid": 3}) == {"amount": 3, "paid": "0.000003"}
    assert CountedPublic(amount=3, paid=3).model_dump(mode="json") == {
        "amount": 3,
        "paid": "0.000003",
    }
    assert is_micro_tokens(MicroTokens)
    assert not is_micro_tokens(int)
    assert is_micro_tokens(MicroTokens | None)


def test_a_task_state_shows_its_max_cost_in_tokens_and_its_payload_as_sent() -> None:
    state = _state(
        TASK_DECIDER,
        SubmitTask(task_id="t1", type="pay", payload={"amount": 7}, max_cost=2 * MICRO, at=AT),
    )
    shown = public_state(STATE_TYPES[TASK], state)
    assert shown is not None
    assert shown["max_cost"] == "2.000000"
    assert shown["payload"] == {"amount": 7}  # free-form data keeps its integers


def test_an_agent_state_shows_its_cost_per_task_in_tokens() -> None:
    state = _state(
        AGENT_DECIDER, RegisterAgent(agent_id="a1", name="a", cost_per_task=500_000, at=AT)
    )
    shown = public_state(STATE_TYPES[AGENT], state)
    assert shown is not None and shown["cost_per_task"] == "0.500000"
    assert shown["max_concurrent_tasks"] == 1


def test_an_account_state_shows_its_money_and_its_pending_unstakes_in_tokens() -> None:
    state = _state(
        ACCOUNT_DECIDER,
        OpenAccount(account_id="a", holder="agent", at=AT),
        Received(
            account_id="a", transfer_id="t0", from_account=TREASURY, amount=10 * MICRO, kind="grant"
        ),
        StakeTokens(account_id="a", amount=4 * MICRO, at=AT),
        RequestUnstake(account_id="a", amount=MICRO, cooldown_s=60, at=AT),
    )
    shown = public_state(STATE_TYPES[ACCOUNT], state)
    assert shown is not None
    assert (shown["balance"], shown["staked"]) == ("6.000000", "3.000000")
    assert (shown["earned"], shown["slashed"], shown["supply"]) == ("0.000000",) * 3
    [pending] = shown["unstaking"]
    assert pending["amount"] == "1.000000"
    assert pending["available_at"] == state["unstaking"][0]["available_at"]


def test_a_proposal_state_shows_its_total_power_in_tokens_and_nested_objects_as_stored() -> None:
    state = _state(
        PROPOSAL_DECIDER,
        CreateProposal(
            proposal_id="p1",
            title="more",
            proposer="a",
            change=ParameterChange(base_reward=20 * MICRO),
            window_s=60,
            powers=(VoterPower(account_id="a", power=3 * MICRO),),
            at=AT,
        ),
    )
    shown = public_state(STATE_TYPES[PROPOSAL], state)
    assert shown is not None
    assert shown["total_power"] == "3.000000"
    # as before the typed path: a nested object and a map keep the domain's integers
    assert shown["change"]["base_reward"] == 20 * MICRO
    assert shown["powers"] == {"a": 3 * MICRO}


def test_the_economy_parameters_show_the_base_reward_in_tokens() -> None:
    shown = public_state(EconomyParameters, EconomyParameters().model_dump(mode="json"))
    assert shown is not None
    assert shown["base_reward"] == "10.000000"
    assert shown["slash_rate_bp"] == EconomyParameters().slash_rate_bp


def test_an_account_row_becomes_an_account_in_tokens() -> None:
    row = {
        "account_id": "a",
        "holder": "agent",
        "balance": 1,
        "staked": 2 * MICRO,
        "unstaking": 0,
        "pending": [{"amount": MICRO, "available_at": AT}],
        "tier": "none",
        "earned": 0,
        "slashed": 0,
        "supply": 0,
        "opened_at": AT,
        "version": 3,
        "updated_at": AT,
    }
    body = AccountPublic.from_row(row).model_dump(mode="json")
    assert body["balance"] == "0.000001"
    assert body["staked"] == "2.000000"
    assert body["pending_unstakes"] == [
        {"amount": "1.000000", "available_at": "2024-01-01T12:00:00Z"}
    ]

"""The Account decider, given/when/then: every command and every rejection code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from domain.account import (
    ACCOUNT_DECIDER,
    AccountOpened,
    AccrueReward,
    GrantTokens,
    MintTokens,
    OpenAccount,
    PayReward,
    PendingUnstake,
    ReceiveTransfer,
    RequestUnstake,
    RewardAccrued,
    SlashStake,
    StakeSlashed,
    StakeTokens,
    TierChanged,
    TokensMinted,
    TokensStaked,
    TokensUnstaked,
    TransferReceived,
    TransferSent,
    TransferTokens,
    UnstakeRequested,
    WithdrawUnstaked,
    ledger_totals,
)
from domain.economy import MAX_AMOUNT, TREASURY
from domain.messages import MICRO
from tests.unit.gwt import given

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
A, B = "alice", "bob"
opened = AccountOpened(account_id=A, holder="agent")
funded = TransferReceived(
    account_id=A, transfer_id="t0", from_account=TREASURY, amount=1_000 * MICRO, kind="grant"
)
treasury_opened = AccountOpened(account_id=TREASURY, holder="treasury")


def at(seconds: float = 0) -> datetime:
    """A command time ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


def test_opens_an_account_once() -> None:
    given(ACCOUNT_DECIDER).when(OpenAccount(account_id=A, holder="agent", at=at())).then(
        opened
    ).and_state(balance=0, staked=0, tier="none")
    given(ACCOUNT_DECIDER, opened).when(OpenAccount(account_id=A, at=at())).then_rejected(
        "account_already_open", kind="conflict"
    )


def test_commands_on_an_unopened_account_are_not_found() -> None:
    for command in (
        TransferTokens(account_id=A, to=B, amount=1, at=at()),
        StakeTokens(account_id=A, amount=1, at=at()),
        RequestUnstake(account_id=A, amount=1, cooldown_s=0, at=at()),
        WithdrawUnstaked(account_id=A, at=at()),
        SlashStake(account_id=A, rate_bp=100, at=at()),
    ):
        given(ACCOUNT_DECIDER).when(command).then_rejected("account_not_found", kind="not_found")


def test_treasury_mints_and_grows_its_supply() -> None:
    given(ACCOUNT_DECIDER).when(MintTokens(account_id=TREASURY, amount=5, at=at())).then(
        treasury_opened, TokensMinted(account_id=TREASURY, amount=5)
    ).and_state(supply=5, balance=5)


def test_mint_past_the_maximum_supply_is_rejected() -> None:
    full = TokensMinted(account_id=TREASURY, amount=MAX_AMOUNT)
    given(ACCOUNT_DECIDER, treasury_opened, full).when(
        MintTokens(account_id=TREASURY, amount=1, at=at())
    ).then_rejected("supply_overflow", kind="invalid", field="amount")
    given(ACCOUNT_DECIDER, treasury_opened, full).when(
        GrantTokens(account_id=TREASURY, to=A, amount=MAX_AMOUNT, at=at())
    ).then(TransferSent(account_id=TREASURY, to=A, amount=MAX_AMOUNT, kind="grant", memo="grant"))


def test_only_the_treasury_mints_grants_and_pays_rewards() -> None:
    for command in (
        MintTokens(account_id=A, amount=1, at=at()),
        GrantTokens(account_id=A, to=B, amount=1, at=at()),
        PayReward(account_id=A, to=B, amount=1, task_id="t", at=at()),
    ):
        given(ACCOUNT_DECIDER, opened).when(command).then_rejected(
            "treasury_only", kind="forbidden", field="account_id"
        )


def test_the_treasury_does_not_stake() -> None:
    for command in (
        StakeTokens(account_id=TREASURY, amount=1, at=at()),
        RequestUnstake(account_id=TREASURY, amount=1, cooldown_s=0, at=at()),
        WithdrawUnstaked(account_id=TREASURY, at=at()),
        SlashStake(account_id=TREASURY, rate_bp=1, at=at()),
    ):
        given(ACCOUNT_DECIDER, treasury_opened).when(command).then_rejected(
            "not_for_treasury", kind="forbidden"
        )


def test_a_grant_mints_only_the_shortfall() -> None:
    minted = TokensMinted(account_id=TREASURY, amount=3)
    given(ACCOUNT_DECIDER, treasury_opened, minted).when(
        GrantTokens(account_id=TREASURY, to=A, amount=10, reason="welcome", at=at())
    ).then(
        TokensMinted(account_id=TREASURY, amount=7),
        TransferSent(account_id=TREASURY, to=A, amount=10, kind="grant", memo="welcome"),
    ).and_state(supply=10, balance=0)
    given(ACCOUNT_DECIDER).when(GrantTokens(account_id=TREASURY, to=A, amount=2, at=at())).then(
        treasury_opened,
        TokensMinted(account_id=TREASURY, amount=2),
        TransferSent(account_id=TREASURY, to=A, amount=2, kind="grant", memo="grant"),
    )


def test_a_reward_is_paid_from_the_treasury_with_its_task() -> None:
    given(ACCOUNT_DECIDER, treasury_opened, TokensMinted(account_id=TREASURY, amount=50)).when(
        PayReward(account_id=TREASURY, to=A, amount=20, task_id="task-9", at=at())
    ).then(
        TransferSent(account_id=TREASURY, to=A, amount=20, kind="reward", task_id="task-9")
    ).and_state(balance=30, supply=50)


def test_transfer_debits_the_balance_and_rejects_an_overdraft() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        TransferTokens(account_id=A, to=B, amount=400 * MICRO, memo="lunch", at=at())
    ).then(
        TransferSent(account_id=A, to=B, amount=400 * MICRO, kind="transfer", memo="lunch")
    ).and_state(balance=600 * MICRO)
    given(ACCOUNT_DECIDER, opened, funded).when(
        TransferTokens(account_id=A, to=B, amount=1_000 * MICRO + 1, at=at())
    ).then_rejected("insufficient_balance", kind="conflict", field="amount")


def test_transfer_to_itself_is_invalid() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        TransferTokens(account_id=A, to=A, amount=1, at=at())
    ).then_rejected("self_transfer", kind="invalid", field="to")
    given(ACCOUNT_DECIDER, treasury_opened).when(
        GrantTokens(account_id=TREASURY, to=TREASURY, amount=1, at=at())
    ).then_rejected("self_transfer", field="to")


def test_a_credit_opens_an_unopened_account() -> None:
    given(ACCOUNT_DECIDER).when(
        ReceiveTransfer(
            account_id=B, transfer_id="x", from_account=A, amount=5, kind="transfer", at=at()
        )
    ).then(
        AccountOpened(account_id=B, holder="holder"),
        TransferReceived(account_id=B, transfer_id="x", from_account=A, amount=5, kind="transfer"),
    ).and_state(balance=5)


def test_a_reward_credit_accrues_earnings() -> None:
    given(ACCOUNT_DECIDER, opened).when(
        AccrueReward(
            account_id=A, transfer_id="x", from_account=TREASURY, amount=7, task_id="t1", at=at()
        )
    ).then(
        RewardAccrued(account_id=A, transfer_id="x", from_account=TREASURY, amount=7, task_id="t1")
    ).and_state(balance=7, earned=7)


def test_staking_moves_balance_to_stake_and_changes_tier() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        StakeTokens(account_id=A, amount=500 * MICRO, at=at())
    ).then(
        TokensStaked(account_id=A, amount=500 * MICRO),
        TierChanged(account_id=A, previous="none", tier="silver"),
    ).and_state(balance=500 * MICRO, staked=500 * MICRO, tier="silver")


def test_staking_within_a_tier_changes_no_tier() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        StakeTokens(account_id=A, amount=99 * MICRO, at=at())
    ).then(TokensStaked(account_id=A, amount=99 * MICRO))


def test_staking_more_than_the_balance_is_rejected() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        StakeTokens(account_id=A, amount=1_000 * MICRO + 1, at=at())
    ).then_rejected("insufficient_balance", field="amount")


staked = (
    opened,
    funded,
    TokensStaked(account_id=A, amount=1_000 * MICRO),
    TierChanged(account_id=A, previous="none", tier="gold"),
)


def test_unstake_starts_a_cooldown_and_lowers_the_tier() -> None:
    given(ACCOUNT_DECIDER, *staked).when(
        RequestUnstake(account_id=A, amount=600 * MICRO, cooldown_s=3600, at=at())
    ).then(
        UnstakeRequested(account_id=A, amount=600 * MICRO, available_at=at(3600)),
        TierChanged(account_id=A, previous="gold", tier="bronze"),
    ).and_state(staked=400 * MICRO, tier="bronze")


def test_unstaking_more_than_the_stake_is_rejected() -> None:
    given(ACCOUNT_DECIDER, *staked).when(
        RequestUnstake(account_id=A, amount=1_000 * MICRO + 1, cooldown_s=0, at=at())
    ).then_rejected("insufficient_stake", kind="conflict", field="amount")


def test_withdraw_takes_only_matured_unstakes() -> None:
    first = UnstakeRequested(account_id=A, amount=100, available_at=at(10))
    second = UnstakeRequested(account_id=A, amount=50, available_at=at(20))
    g = given(ACCOUNT_DECIDER, *staked, first, second)
    g.when(WithdrawUnstaked(account_id=A, at=at(5))).then_rejected(
        "unstake_not_ready", kind="conflict"
    )
    s = (
        g.when(WithdrawUnstaked(account_id=A, at=at(15)))
        .then(TokensUnstaked(account_id=A, amount=100, released=(pending(100, 10),)))
        .and_state(balance=100)
    )
    assert [p.amount for p in s.unstaking] == [50]
    g.when(WithdrawUnstaked(account_id=A, at=at(20))).then(
        TokensUnstaked(account_id=A, amount=150, released=(pending(100, 10), pending(50, 20)))
    )


def pending(amount: int, seconds: int) -> PendingUnstake:
    return PendingUnstake(amount=amount, available_at=at(seconds))


def test_a_withdrawal_recorded_before_it_listed_what_it_released_folds_as_it_did() -> None:
    # Three unstakes requested out of maturity order (a cooldown was cut in between), two
    # of the same amount; the withdrawal at 25 s released those matured by then: 30 + 40.
    history = [
        *staked,
        UnstakeRequested(account_id=A, amount=40, available_at=at(20)),
        UnstakeRequested(account_id=A, amount=40, available_at=at(30)),
        UnstakeRequested(account_id=A, amount=30, available_at=at(10)),
    ]
    # A record on the log in the old shape: no "released".
    old = TokensUnstaked.model_validate({"account_id": A, "amount": 70})
    assert old.released is None
    before = ACCOUNT_DECIDER.fold(history)
    assert before is not None
    folded_old = ACCOUNT_DECIDER.fold([old], before)
    assert folded_old is not None
    # What the evolve of that time made of it: the matured ones gone, the rest oldest first.
    assert folded_old.unstaking == (pending(40, 30),)
    assert folded_old.balance == before.balance + 70
    # The same withdrawal decided now says what it released, and folds to the same state.
    new = ACCOUNT_DECIDER.decide(WithdrawUnstaked(account_id=A, at=at(25)), before)
    assert new == [
        TokensUnstaked(account_id=A, amount=70, released=(pending(30, 10), pending(40, 20)))
    ]
    assert ACCOUNT_DECIDER.fold(new, before) == folded_old


def test_withdraw_with_no_unstake_is_rejected() -> None:
    given(ACCOUNT_DECIDER, *staked).when(WithdrawUnstaked(account_id=A, at=at())).then_rejected(
        "nothing_to_withdraw", kind="conflict"
    )


def test_slash_takes_a_share_of_the_stake_rounded_down() -> None:
    given(ACCOUNT_DECIDER, *staked).when(
        SlashStake(account_id=A, rate_bp=333, task_id="t1", at=at())
    ).then(
        StakeSlashed(account_id=A, amount=33_300_000, rate_bp=333, task_id="t1"),
        TierChanged(account_id=A, previous="gold", tier="silver"),
    ).and_state(staked=1_000 * MICRO - 33_300_000, slashed=33_300_000)


def test_slash_of_nothing_is_rejected() -> None:
    given(ACCOUNT_DECIDER, opened, funded).when(
        SlashStake(account_id=A, rate_bp=1000, at=at())
    ).then_rejected("nothing_staked", kind="conflict")


@pytest.mark.parametrize("amount", [0, -1, MAX_AMOUNT + 1])
def test_amounts_must_be_positive_and_bounded(amount: int) -> None:
    with pytest.raises(ValidationError):
        TransferTokens(account_id=A, to=B, amount=amount, at=at())
    with pytest.raises(ValidationError):
        StakeTokens(account_id=A, amount=amount, at=at())


def test_ledger_counts_debits_in_flight_until_credited() -> None:
    t_state = ACCOUNT_DECIDER.fold([treasury_opened, TokensMinted(account_id=TREASURY, amount=10)])
    sent = TransferSent(account_id=TREASURY, to=A, amount=4, kind="grant")
    t_after = ACCOUNT_DECIDER.evolve(t_state, sent)
    mid = ledger_totals([t_after], [sent])
    assert mid.in_flight == 4 and mid.balanced
    credit = TransferReceived(
        account_id=A, transfer_id="x", from_account=TREASURY, amount=4, kind="grant"
    )
    a_state = ACCOUNT_DECIDER.fold([opened, credit])
    done = ledger_totals([t_after, a_state], [sent, credit])
    assert done.in_flight == 0 and done.balanced and done.balances == 10
    assert not ledger_totals([t_after], []).balanced


def test_registered_in_the_registry() -> None:
    from domain.registry import DECIDERS

    assert DECIDERS["account"] is ACCOUNT_DECIDER

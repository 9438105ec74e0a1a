"""Stateful property: any sequence of economy commands keeps the ledger balanced.

A hypothesis state machine drives the Account decider (through decide and evolve only)
with grants, rewards, transfers, stakes, unstakes, withdrawals and slashes, and delivers
the credits of in-flight debits in any order, as the ledger process manager would.
After every step: supply = balances + staked + unstaking + in flight, and no balance,
stake or unstaking amount is negative.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domain.account import (
    ACCOUNT_DECIDER,
    DEBITS,
    AccountCommand,
    AccountEvent,
    GrantTokens,
    OpenAccount,
    PayReward,
    ReceiveTransfer,
    RequestUnstake,
    SlashStake,
    StakeTokens,
    TransferTokens,
    WithdrawUnstaked,
    ledger_totals,
)
from domain.economy import TREASURY
from domain.messages import MICRO, Rejection

HOLDERS = ("a", "b", "c")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
amounts = st.integers(min_value=1, max_value=20_000 * MICRO)
holders = st.sampled_from(HOLDERS)


class Ledger(RuleBasedStateMachine):
    """The Account aggregates of a few holders and the treasury, with pending credits."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, Any] = {}
        self.events: list[AccountEvent] = []
        self.pending: list[tuple[str, AccountEvent]] = []  # (debit id, debit)
        self.now = T0
        self.seq = 0
        self.accepted = 0

    def _run(self, command: AccountCommand) -> list[AccountEvent] | Rejection:
        aid = command.account_id
        result = ACCOUNT_DECIDER.decide(command, self.states.get(aid))
        if isinstance(result, Rejection):
            return result
        assert result, "decide never returns an empty list"
        self.accepted += 1
        for e in result:
            self.states[aid] = ACCOUNT_DECIDER.evolve(self.states.get(aid), e)
            self.events.append(e)
            if isinstance(e, DEBITS):
                self.seq += 1
                self.pending.append((f"d{self.seq}", e))
        return result

    @rule(holder=holders)
    def open(self, holder: str) -> None:
        self._run(OpenAccount(account_id=holder, at=self.now))

    @rule(to=holders, amount=amounts)
    def grant(self, to: str, amount: int) -> None:
        self._run(GrantTokens(account_id=TREASURY, to=to, amount=amount, at=self.now))

    @rule(to=holders, amount=st.integers(min_value=1, max_value=100 * MICRO))
    def reward(self, to: str, amount: int) -> None:
        self._run(PayReward(account_id=TREASURY, to=to, amount=amount, task_id="t", at=self.now))

    @rule(src=holders, to=st.sampled_from((*HOLDERS, TREASURY)), amount=amounts)
    def transfer(self, src: str, to: str, amount: int) -> None:
        self._run(TransferTokens(account_id=src, to=to, amount=amount, at=self.now))

    @rule(holder=holders, amount=amounts)
    def stake(self, holder: str, amount: int) -> None:
        self._run(StakeTokens(account_id=holder, amount=amount, at=self.now))

    @rule(holder=holders, amount=amounts, cooldown=st.integers(0, 100))
    def unstake(self, holder: str, amount: int, cooldown: int) -> None:
        self._run(
            RequestUnstake(account_id=holder, amount=amount, cooldown_s=cooldown, at=self.now)
        )

    @rule(holder=holders)
    def withdraw(self, holder: str) -> None:
        self._run(WithdrawUnstaked(account_id=holder, at=self.now))

    @rule(holder=holders, rate=st.integers(1, 10_000))
    def slash(self, holder: str, rate: int) -> None:
        self._run(SlashStake(account_id=holder, rate_bp=rate, at=self.now))

    @rule(seconds=st.integers(1, 60))
    def wait(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @precondition(lambda self: bool(self.pending))
    @rule(pick=st.integers(min_value=0))
    def credit(self, pick: int) -> None:
        debit_id, debit = self.pending.pop(pick % len(self.pending))
        result = self._run(
            ReceiveTransfer(
                account_id=debit.to,  # type: ignore[attr-defined]
                transfer_id=debit_id,
                from_account=debit.account_id,
                amount=debit.amount,  # type: ignore[attr-defined]
                kind=getattr(debit, "kind", "slash"),
                at=self.now,
            )
        )
        assert not isinstance(result, Rejection), "a credit is never refused"

    @invariant()
    def balanced(self) -> None:
        totals = ledger_totals([s for s in self.states.values() if s is not None], self.events)
        assert totals.balanced, totals
        assert totals.in_flight == sum(d.amount for _, d in self.pending)  # type: ignore[attr-defined]

    @invariant()
    def nothing_negative(self) -> None:
        for s in self.states.values():
            assert s.balance >= 0 and s.staked >= 0
            assert all(p.amount > 0 for p in s.unstaking)

    def teardown(self) -> None:
        while self.pending:
            self.credit(0)
        totals = ledger_totals(list(self.states.values()), self.events)
        assert totals.in_flight == 0 and totals.balanced


TestLedgerStateMachine = Ledger.TestCase
TestLedgerStateMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)

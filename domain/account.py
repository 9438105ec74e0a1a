"""The Account aggregate: a holder's tokens, free (balance), staked and unstaking.

Amounts are integers in micro-tokens. The treasury is the account ``"treasury"``: the
issuer, whose ``supply`` is every token ever minted. It mints on demand what a grant
or a reward needs beyond its balance, so rewards never stall on an empty treasury.

**Movements between two accounts.** One command changes one aggregate, so a movement
from A to B is two events on two aggregates: a *debit* on A (``TransferSent`` for
transfers, grants and rewards; ``StakeSlashed`` for a slash, whose destination is the
treasury) and then a *credit* on B (``TransferReceived``, or ``RewardAccrued`` for a
reward) that the ledger process manager (streams/ledger.py) sends when it reads the
debit, with a command id derived from the debit's event id, so a replayed debit
credits once. A credit is never refused: the destination needs no prior opening (an
account is a key; the credit opens it), so no money is stranded and no refund flow is
needed. Until the credit is on the log the amount is *in flight*, and the ledger
invariant is, at every committed position of the log::

    supply (treasury's minted) = sum over accounts of (balance + staked + unstaking)
                                 + in flight (debits not yet credited)

(the treasury's own balance is one of the balances). ``ledger_totals`` folds it.

Stake: ``StakeTokens`` moves balance to staked; ``RequestUnstake`` moves staked to a
pending unstake that matures ``cooldown_s`` seconds after the command's ``at``;
``WithdrawUnstaked`` moves every matured pending unstake back to the balance. A change
of staked amount that crosses a tier threshold (domain/economy.py) adds a
``TierChanged`` event.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from domain.economy import BP, MAX_AMOUNT, TREASURY, Tier, slash_amount, tier_for
from domain.messages import Command, Decider, Event, Message, Rejection, Upcaster, rejected
from domain.money import MicroTokens

ACCOUNT = "account"

TransferKind = Literal["transfer", "grant", "reward", "slash"]


class PendingUnstake(Message):
    """An unstaked amount waiting for its cooldown (withdrawable from ``available_at``)."""

    amount: MicroTokens
    available_at: datetime


class AccountCommand(Command):
    """A command addressed to one Account aggregate, keyed by ``account_id``."""

    aggregate_type: ClassVar[str] = ACCOUNT
    id_field: ClassVar[str] = "account_id"
    account_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")


class OpenAccount(AccountCommand):
    """Open an account for a holder (an agent's opens when it registers)."""

    holder: Literal["agent", "holder"] = "holder"


class MintTokens(AccountCommand):
    """Mint ``amount`` new tokens into the treasury's balance (treasury only)."""

    amount: int = Field(gt=0, le=MAX_AMOUNT)


Memo = Annotated[str, Field(max_length=500)]
"""A note on a movement of tokens: a grant's reason, a transfer's memo (also used by the
HTTP API's bodies, api/schemas/accounts.py)."""
DEFAULT_GRANT_REASON = "grant"


class GrantTokens(AccountCommand):
    """The treasury grants ``amount`` to ``to`` (an admin act); mints any shortfall."""

    to: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    amount: int = Field(gt=0, le=MAX_AMOUNT)
    reason: Memo = DEFAULT_GRANT_REASON


class PayReward(AccountCommand):
    """The treasury pays a reward for ``task_id`` to ``to``; mints any shortfall."""

    to: str = Field(min_length=1, max_length=128)
    amount: int = Field(gt=0, le=MAX_AMOUNT)
    task_id: str = Field(min_length=1, max_length=128)
    cause: str | None = None


class TransferTokens(AccountCommand):
    """Send ``amount`` of this account's balance to ``to``."""

    to: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    amount: int = Field(gt=0, le=MAX_AMOUNT)
    memo: Memo = ""


class ReceiveTransfer(AccountCommand):
    """Credit a debit of another account (sent by the ledger process manager).

    ``transfer_id`` is the debit's event id; ``kind`` says what moved
    (a ``reward`` credits as ``RewardAccrued``).
    """

    transfer_id: str = Field(min_length=1)
    from_account: str = Field(min_length=1)
    amount: int = Field(gt=0, le=MAX_AMOUNT)
    kind: TransferKind
    task_id: str | None = None


class AccrueReward(ReceiveTransfer):
    """Credit a reward paid by the treasury (a ``ReceiveTransfer`` of kind reward)."""

    kind: TransferKind = "reward"


class StakeTokens(AccountCommand):
    """Stake ``amount`` of the balance."""

    amount: int = Field(gt=0, le=MAX_AMOUNT)


class RequestUnstake(AccountCommand):
    """Start unstaking ``amount``: it may be withdrawn ``cooldown_s`` seconds after ``at``.

    ``cooldown_s`` is the governed unstake cooldown in force (the API reads it from the
    economy parameters).
    """

    amount: int = Field(gt=0, le=MAX_AMOUNT)
    cooldown_s: int = Field(ge=0, le=365 * 86_400)


class WithdrawUnstaked(AccountCommand):
    """Move every unstake whose cooldown has passed at ``at`` back to the balance."""


class SlashStake(AccountCommand):
    """Slash ``rate_bp`` basis points of the staked amount to the treasury (rounded down).

    ``task_id`` names the task the agent lost; sent by the rewards process manager.
    """

    rate_bp: int = Field(gt=0, le=BP)
    task_id: str | None = None
    reason: str = Field(default="task_lost", max_length=500)
    cause: str | None = None


class AccountEvent(Event):
    """An event of one Account aggregate."""

    aggregate_type: ClassVar[str] = ACCOUNT
    account_id: str


class AccountOpened(AccountEvent):
    """The account was opened."""

    event_type: ClassVar[str] = "opened"
    holder: str = "holder"


class TokensMinted(AccountEvent):
    """The treasury minted ``amount`` (its supply and balance grow by it)."""

    event_type: ClassVar[str] = "tokens_minted"
    amount: int


class TransferSent(AccountEvent):
    """A debit of ``amount`` from the balance, on its way to ``to`` (in flight)."""

    event_type: ClassVar[str] = "transfer_sent"
    to: str
    amount: int
    kind: TransferKind
    task_id: str | None = None
    memo: str = ""
    cause: str | None = None


class TransferReceived(AccountEvent):
    """A credit of ``amount`` to the balance, of the debit ``transfer_id`` of ``from_account``."""

    event_type: ClassVar[str] = "transfer_received"
    transfer_id: str
    from_account: str
    amount: int
    kind: TransferKind
    task_id: str | None = None


class RewardAccrued(AccountEvent):
    """A reward for ``task_id`` was credited to the balance (debit ``transfer_id``)."""

    event_type: ClassVar[str] = "reward_accrued"
    transfer_id: str
    from_account: str
    amount: int
    task_id: str | None = None


class TokensStaked(AccountEvent):
    """``amount`` moved from the balance to the stake."""

    event_type: ClassVar[str] = "tokens_staked"
    amount: int


class UnstakeRequested(AccountEvent):
    """``amount`` moved from the stake to unstaking; withdrawable from ``available_at``."""

    event_type: ClassVar[str] = "unstake_requested"
    amount: int
    available_at: datetime


def _released_unknown(data: dict[str, Any]) -> dict[str, Any]:
    """Upcast a version-1 ``TokensUnstaked`` (no ``released``) to version 2: what it
    released is not in the record (None); ``released_from`` reads it from the state."""
    return {**data, "released": None}


class TokensUnstaked(AccountEvent):
    """``amount`` of matured unstakes moved back to the balance: the pending unstakes
    ``released`` (their amounts sum to ``amount``), as the decider found them matured.

    Schema version 2 added ``released``. Version-1 records (written before 2026-11-29)
    lack it and are upcast with ``released`` None; they released every pending unstake
    that had matured at the command's time, which are the oldest (by ``available_at``)
    and sum to ``amount``, so ``released_from`` reads them back from the state they
    applied to.
    """

    event_type: ClassVar[str] = "tokens_unstaked"
    schema_version: ClassVar[int] = 2
    upcasters: ClassVar[tuple[Upcaster, ...]] = (_released_unknown,)
    amount: int
    released: tuple[PendingUnstake, ...] | None = None

    def released_from(self, pending: tuple[PendingUnstake, ...]) -> tuple[PendingUnstake, ...]:
        """The pending unstakes this event released out of ``pending`` (the state's
        before it): ``released`` when the record carries it, else the oldest of
        ``pending`` whose amounts make ``amount`` (the reading of records without it)."""
        if self.released is not None:
            return self.released
        left, taken = self.amount, []
        for p in sorted(pending, key=lambda p: p.available_at):
            if left >= p.amount:
                left -= p.amount
                taken.append(p)
        return tuple(taken)


class StakeSlashed(AccountEvent):
    """``amount`` of the stake was slashed, on its way to the treasury (in flight)."""

    event_type: ClassVar[str] = "stake_slashed"
    amount: int
    rate_bp: int
    to: str = TREASURY
    task_id: str | None = None
    reason: str = "task_lost"
    cause: str | None = None


class TierChanged(AccountEvent):
    """The staking tier changed from ``previous`` to ``tier``."""

    event_type: ClassVar[str] = "tier_changed"
    previous: Tier
    tier: Tier


CREDITS = (TransferReceived, RewardAccrued)
DEBITS = (TransferSent, StakeSlashed)


class AccountState(Message):
    """The write-side state of one account (micro-tokens).

    ``supply`` is non-zero only on the treasury (everything it minted).
    """

    account_id: str
    holder: str = "holder"
    balance: MicroTokens = 0
    staked: MicroTokens = 0
    unstaking: tuple[PendingUnstake, ...] = ()
    supply: MicroTokens = 0
    tier: Tier = "none"
    earned: MicroTokens = 0
    slashed: MicroTokens = 0

    @property
    def unstaking_total(self) -> int:
        """Micro-tokens waiting for their cooldown."""
        return sum(p.amount for p in self.unstaking)

    @property
    def holdings(self) -> int:
        """balance + staked + unstaking."""
        return self.balance + self.staked + self.unstaking_total


def _tier_events(state: AccountState, staked_after: int) -> list[AccountEvent]:
    tier = tier_for(staked_after)
    if tier == state.tier:
        return []
    return [TierChanged(account_id=state.account_id, previous=state.tier, tier=tier)]


def _insufficient(what: str, have: int, need: int) -> Rejection:
    return rejected(
        "conflict",
        f"insufficient_{what}",
        f"{what} is {have} micro-tokens, {need} needed",
        field="amount",
    )


def _mint_shortfall(
    state: AccountState | None, aid: str, amount: int
) -> list[AccountEvent] | Rejection:
    """Events that bring the treasury's balance up to ``amount`` (opening it if needed)."""
    out: list[AccountEvent] = []
    balance, supply = 0, 0
    if state is None:
        out.append(AccountOpened(account_id=aid, holder="treasury"))
    else:
        balance, supply = state.balance, state.supply
    if balance < amount:
        short = amount - balance
        if supply + short > MAX_AMOUNT:
            return rejected(
                "invalid", "supply_overflow", f"supply would exceed {MAX_AMOUNT}", field="amount"
            )
        out.append(TokensMinted(account_id=aid, amount=short))
    return out


def decide(command: AccountCommand, state: AccountState | None) -> list[AccountEvent] | Rejection:
    """Decide the events for ``command`` given the account's ``state`` (None: not open).

    Rejections: ``account_not_found`` (not_found); ``account_already_open``,
    ``insufficient_balance``, ``insufficient_stake``, ``nothing_staked``,
    ``unstake_not_ready``, ``nothing_to_withdraw`` (conflict); ``treasury_only``,
    ``not_for_treasury`` (forbidden); ``self_transfer``, ``supply_overflow`` (invalid).
    Amount rejections name the field ``amount``.
    """
    aid = command.account_id
    is_treasury = aid == TREASURY
    match command:
        case MintTokens() | GrantTokens() | PayReward() if not is_treasury:
            return rejected(
                "forbidden",
                "treasury_only",
                f"{type(command).__name__} is for the treasury",
                field="account_id",
            )
        case StakeTokens() | RequestUnstake() | WithdrawUnstaked() | SlashStake() if is_treasury:
            return rejected(
                "forbidden", "not_for_treasury", "the treasury does not stake", field="account_id"
            )
        case TransferTokens() | GrantTokens() | PayReward() if command.to == aid:
            return rejected("invalid", "self_transfer", "an account cannot pay itself", field="to")
    match command, state:
        case OpenAccount(), None:
            return [
                AccountOpened(account_id=aid, holder="treasury" if is_treasury else command.holder)
            ]
        case OpenAccount(), AccountState():
            return rejected("conflict", "account_already_open", f"account {aid} is open")
        case MintTokens(), _:
            opened = [] if state is not None else [AccountOpened(account_id=aid, holder="treasury")]
            supply = state.supply if state is not None else 0
            if supply + command.amount > MAX_AMOUNT:
                return rejected(
                    "invalid",
                    "supply_overflow",
                    f"supply would exceed {MAX_AMOUNT}",
                    field="amount",
                )
            return [*opened, TokensMinted(account_id=aid, amount=command.amount)]
        case GrantTokens() | PayReward(), _:
            minted = _mint_shortfall(state, aid, command.amount)
            if isinstance(minted, Rejection):
                return minted
            debit: TransferSent
            if isinstance(command, GrantTokens):
                debit = TransferSent(
                    account_id=aid,
                    to=command.to,
                    amount=command.amount,
                    kind="grant",
                    memo=command.reason,
                )
            else:
                debit = TransferSent(
                    account_id=aid,
                    to=command.to,
                    amount=command.amount,
                    kind="reward",
                    task_id=command.task_id,
                    cause=command.cause,
                )
            return [*minted, debit]
        case ReceiveTransfer(), _:
            opened = [] if state is not None else [AccountOpened(account_id=aid, holder="holder")]
            credit: AccountEvent
            if command.kind == "reward":
                credit = RewardAccrued(
                    account_id=aid,
                    transfer_id=command.transfer_id,
                    from_account=command.from_account,
                    amount=command.amount,
                    task_id=command.task_id,
                )
            else:
                credit = TransferReceived(
                    account_id=aid,
                    transfer_id=command.transfer_id,
                    from_account=command.from_account,
                    amount=command.amount,
                    kind=command.kind,
                    task_id=command.task_id,
                )
            return [*opened, credit]
        case _, None:
            return rejected("not_found", "account_not_found", f"no account {aid}")
        case TransferTokens(), AccountState():
            if state.balance < command.amount:
                return _insufficient("balance", state.balance, command.amount)
            return [
                TransferSent(
                    account_id=aid,
                    to=command.to,
                    amount=command.amount,
                    kind="transfer",
                    memo=command.memo,
                )
            ]
        case StakeTokens(), AccountState():
            if state.balance < command.amount:
                return _insufficient("balance", state.balance, command.amount)
            return [
                TokensStaked(account_id=aid, amount=command.amount),
                *_tier_events(state, state.staked + command.amount),
            ]
        case RequestUnstake(), AccountState():
            if state.staked < command.amount:
                return _insufficient("stake", state.staked, command.amount)
            return [
                UnstakeRequested(
                    account_id=aid,
                    amount=command.amount,
                    available_at=command.at + timedelta(seconds=command.cooldown_s),
                ),
                *_tier_events(state, state.staked - command.amount),
            ]
        case WithdrawUnstaked(), AccountState():
            if not state.unstaking:
                return rejected("conflict", "nothing_to_withdraw", f"account {aid} has no unstake")
            matured = tuple(p for p in state.unstaking if p.available_at <= command.at)
            if not matured:
                first = min(p.available_at for p in state.unstaking)
                return rejected(
                    "conflict",
                    "unstake_not_ready",
                    f"the first unstake may be withdrawn from {first.isoformat()}",
                )
            return [
                TokensUnstaked(
                    account_id=aid,
                    amount=sum(p.amount for p in matured),
                    released=tuple(sorted(matured, key=lambda p: p.available_at)),
                )
            ]
        case SlashStake(), AccountState():
            amount = slash_amount(state.staked, command.rate_bp)
            if amount == 0:
                return rejected("conflict", "nothing_staked", f"account {aid} has nothing to slash")
            return [
                StakeSlashed(
                    account_id=aid,
                    amount=amount,
                    rate_bp=command.rate_bp,
                    task_id=command.task_id,
                    reason=command.reason,
                    cause=command.cause,
                ),
                *_tier_events(state, state.staked - amount),
            ]
    return rejected("invalid", "unknown_command", f"not an account command: {command!r}")


def evolve(state: AccountState | None, event: AccountEvent) -> AccountState | None:
    """Apply ``event`` to ``state``; never raises, never checks rules."""
    if isinstance(event, AccountOpened):
        return AccountState(account_id=event.account_id, holder=event.holder)
    if state is None:
        return None
    match event:
        case TokensMinted():
            return state.model_copy(
                update={
                    "supply": state.supply + event.amount,
                    "balance": state.balance + event.amount,
                }
            )
        case TransferSent():
            return state.model_copy(update={"balance": state.balance - event.amount})
        case TransferReceived():
            return state.model_copy(update={"balance": state.balance + event.amount})
        case RewardAccrued():
            return state.model_copy(
                update={
                    "balance": state.balance + event.amount,
                    "earned": state.earned + event.amount,
                }
            )
        case TokensStaked():
            return state.model_copy(
                update={
                    "balance": state.balance - event.amount,
                    "staked": state.staked + event.amount,
                }
            )
        case UnstakeRequested():
            return state.model_copy(
                update={
                    "staked": state.staked - event.amount,
                    "unstaking": (
                        *state.unstaking,
                        PendingUnstake(amount=event.amount, available_at=event.available_at),
                    ),
                }
            )
        case TokensUnstaked():
            return state.model_copy(
                update={
                    "balance": state.balance + event.amount,
                    "unstaking": _without(state.unstaking, event.released_from(state.unstaking)),
                }
            )
        case StakeSlashed():
            return state.model_copy(
                update={
                    "staked": state.staked - event.amount,
                    "slashed": state.slashed + event.amount,
                }
            )
        case TierChanged():
            return state.model_copy(update={"tier": event.tier})
    return state


def _without(
    pending: tuple[PendingUnstake, ...], released: tuple[PendingUnstake, ...]
) -> tuple[PendingUnstake, ...]:
    """``pending`` less each of ``released`` once, the rest oldest first."""
    left = list(released)
    keep = []
    for p in sorted(pending, key=lambda p: p.available_at):
        if p in left:
            left.remove(p)
        else:
            keep.append(p)
    return tuple(keep)


class LedgerTotals(Message):
    """The ledger's totals over every account (micro-tokens)."""

    supply: int = 0
    balances: int = 0
    staked: int = 0
    unstaking: int = 0
    in_flight: int = 0

    @property
    def balanced(self) -> bool:
        """True when supply = balances + staked + unstaking + in flight."""
        return self.supply == self.balances + self.staked + self.unstaking + self.in_flight


def ledger_totals(states: Iterable[AccountState], events: Iterable[AccountEvent]) -> LedgerTotals:
    """The totals of ``states``, with in flight = debits - credits among ``events``."""
    in_flight = 0
    for e in events:
        if isinstance(e, DEBITS):
            in_flight += e.amount
        elif isinstance(e, CREDITS):
            in_flight -= e.amount
    t = LedgerTotals(in_flight=in_flight)
    for s in states:
        t = t.model_copy(
            update={
                "supply": t.supply + s.supply,
                "balances": t.balances + s.balance,
                "staked": t.staked + s.staked,
                "unstaking": t.unstaking + s.unstaking_total,
            }
        )
    return t


ACCOUNT_DECIDER: Decider[AccountCommand, AccountState, AccountEvent] = Decider(
    aggregate_type=ACCOUNT,
    command_types=(
        OpenAccount,
        MintTokens,
        GrantTokens,
        PayReward,
        TransferTokens,
        ReceiveTransfer,
        AccrueReward,
        StakeTokens,
        RequestUnstake,
        WithdrawUnstaked,
        SlashStake,
    ),
    event_types=(
        AccountOpened,
        TokensMinted,
        TransferSent,
        TransferReceived,
        RewardAccrued,
        TokensStaked,
        UnstakeRequested,
        TokensUnstaked,
        StakeSlashed,
        TierChanged,
    ),
    decide=decide,
    evolve=evolve,
)

"""Accounts: open, grant (from the treasury), transfer, stake, unstake, withdraw; read an
account and its ledger. Money in tokens as decimal strings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from api.deps import Cursor, FreshDep, Limit, PoolDep, SettingsDep
from api.dispatch import COMMAND_RESPONSES, DispatchDep
from api.pagination import INT8, decode_cursor, encode_cursor
from api.problems import Problem
from api.schemas import (
    ID_PATTERN,
    AccountCreate,
    AccountPublic,
    AmountIn,
    CommandResult,
    Grant,
    LedgerEntryPublic,
    Page,
    Transfer,
    format_tokens,
    to_micro,
)
from domain import account as ac
from domain.economy import TREASURY, EconomyParameters
from projections import queries

router = APIRouter(prefix="/accounts", tags=["accounts"])

AccountIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="the account id")
]


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def open_account(body: AccountCreate, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Open an account (an agent's opens by itself when it registers)."""
    command = dispatch.command(ac.OpenAccount, account_id=body.account_id)
    return await dispatch.execute(command, created_at=f"/accounts/{body.account_id}")


@router.post("/{account_id}/grant", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def grant(account_id: AccountIdPath, body: Grant, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Grant tokens from the treasury to the account (the treasury mints any shortfall).

    The answer is the treasury's debit; the credit follows (the account's ledger shows it).
    """
    command = dispatch.command(
        ac.GrantTokens,
        account_id=TREASURY,
        to=account_id,
        amount=to_micro(body.amount),
        reason=body.reason,
    )
    return await dispatch.execute(command)


@router.post("/{account_id}/transfer", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def transfer(account_id: AccountIdPath, body: Transfer, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Send tokens of the balance to another account (409 insufficient_balance if short)."""
    command = dispatch.command(
        ac.TransferTokens,
        account_id=account_id,
        to=body.to,
        amount=to_micro(body.amount),
        memo=body.memo,
    )
    return await dispatch.execute(command)


@router.post("/{account_id}/stake", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def stake(account_id: AccountIdPath, body: AmountIn, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Stake tokens of the balance (a tier change is an event of its own)."""
    command = dispatch.command(ac.StakeTokens, account_id=account_id, amount=to_micro(body.amount))
    return await dispatch.execute(command)


@router.post("/{account_id}/unstake", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def unstake(  # type: ignore[no-untyped-def]
    account_id: AccountIdPath,
    body: AmountIn,
    dispatch: DispatchDep,
    settings: SettingsDep,
    pool: PoolDep,
):
    """Start unstaking: withdrawable after the governed cooldown in force."""
    row = await queries.economy_parameters(pool, settings.db_schema)
    params = EconomyParameters.model_validate(row["params"]) if row else EconomyParameters()
    command = dispatch.command(
        ac.RequestUnstake,
        account_id=account_id,
        amount=to_micro(body.amount),
        cooldown_s=params.unstake_cooldown_s,
    )
    return await dispatch.execute(command)


@router.post("/{account_id}/withdraw", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def withdraw(account_id: AccountIdPath, dispatch: DispatchDep):  # type: ignore[no-untyped-def]
    """Move every unstake whose cooldown has passed back to the balance."""
    return await dispatch.execute(dispatch.command(ac.WithdrawUnstaked, account_id=account_id))


@router.get(
    "/{account_id}",
    response_model=AccountPublic,
    responses={404: {"description": "no such account"}},
)
async def get_account(
    account_id: AccountIdPath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    response: Response,
) -> AccountPublic:
    """One account: balance, staked, unstaking, tier, earnings; ``ETag`` its version."""
    row = await queries.get_account(pool, settings.db_schema, account_id)
    if row is None:
        raise Problem(404, "account_not_found", f"no account {account_id}", field="account_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return AccountPublic.from_row(row)


@router.get("/{account_id}/ledger", response_model=Page[LedgerEntryPublic])
async def get_ledger(
    account_id: AccountIdPath,
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[LedgerEntryPublic]:
    """The account's ledger legs in log order: every movement with its cause (kind,
    counterparty, task id, command id)."""
    key = decode_cursor("ledger", cursor, INT8)
    rows = await queries.account_ledger(
        pool, settings.db_schema, account_id, after=key[0] if key else None, limit=limit + 1
    )
    items = [LedgerEntryPublic(**{**r, "amount": format_tokens(r["amount"])}) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor("ledger", items[-1].seq) if more else None)

"""Accounts: open, grant (from the treasury), transfer, stake, unstake, withdraw; read an
account and its ledger. Money in tokens as decimal strings."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from api.deps import AccountIdPath, Cursor, DispatchDep, FreshDep, Limit, ReadModelsDep
from api.dispatch import COMMAND_RESPONSES
from api.pagination import INT8, Keyset
from api.problems import Problem
from api.schemas.accounts import (
    AccountCreate,
    AccountPublic,
    AmountIn,
    Grant,
    LedgerEntryPublic,
    Transfer,
)
from api.schemas.commands import CommandResult
from api.schemas.common import Page
from api.schemas.money import to_micro
from domain import account as ac
from domain.economy import TREASURY, EconomyParameters
from projections import queries

router = APIRouter(prefix="/accounts", tags=["accounts"])

#: In log order (by ``seq``).
LEDGER = Keyset("ledger", (INT8,), lambda row: (row["seq"],))


@router.post("", status_code=201, response_model=CommandResult, responses=COMMAND_RESPONSES)
async def open_account(body: AccountCreate, dispatch: DispatchDep) -> JSONResponse:
    """Open an account (an agent's opens by itself when it registers)."""
    command = dispatch.command(ac.OpenAccount, account_id=body.account_id)
    return await dispatch.execute(command, created_at=f"/accounts/{body.account_id}")


@router.post("/{account_id}/grant", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def grant(account_id: AccountIdPath, body: Grant, dispatch: DispatchDep) -> JSONResponse:
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
async def transfer(
    account_id: AccountIdPath, body: Transfer, dispatch: DispatchDep
) -> JSONResponse:
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
async def stake(account_id: AccountIdPath, body: AmountIn, dispatch: DispatchDep) -> JSONResponse:
    """Stake tokens of the balance (a tier change is an event of its own)."""
    command = dispatch.command(ac.StakeTokens, account_id=account_id, amount=to_micro(body.amount))
    return await dispatch.execute(command)


@router.post("/{account_id}/unstake", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def unstake(
    account_id: AccountIdPath,
    body: AmountIn,
    dispatch: DispatchDep,
    read_models: ReadModelsDep,
) -> JSONResponse:
    """Start unstaking: withdrawable after the governed cooldown in force."""
    row = await read_models(queries.economy_parameters)
    params = EconomyParameters.model_validate(row["params"]) if row else EconomyParameters()
    command = dispatch.command(
        ac.RequestUnstake,
        account_id=account_id,
        amount=to_micro(body.amount),
        cooldown_s=params.unstake_cooldown_s,
    )
    return await dispatch.execute(command)


@router.post("/{account_id}/withdraw", response_model=CommandResult, responses=COMMAND_RESPONSES)
async def withdraw(account_id: AccountIdPath, dispatch: DispatchDep) -> JSONResponse:
    """Move every unstake whose cooldown has passed back to the balance."""
    return await dispatch.execute(dispatch.command(ac.WithdrawUnstaked, account_id=account_id))


@router.get(
    "/{account_id}",
    response_model=AccountPublic,
    responses={404: {"description": "no such account"}},
)
async def get_account(
    account_id: AccountIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    response: Response,
) -> AccountPublic:
    """One account: balance, staked, unstaking, tier, earnings; ``ETag`` its version."""
    row = await read_models(queries.get_account, account_id)
    if row is None:
        raise Problem(404, "account_not_found", f"no account {account_id}", field="account_id")
    response.headers["ETag"] = f'"{row["version"]}"'
    return AccountPublic.from_row(row)


@router.get("/{account_id}/ledger", response_model=Page[LedgerEntryPublic])
async def get_ledger(
    account_id: AccountIdPath,
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[LedgerEntryPublic]:
    """The account's ledger legs in log order: every movement with its cause (kind,
    counterparty, task id, command id)."""
    rows = await read_models(
        queries.account_ledger, account_id, after=LEDGER.after(cursor), limit=limit + 1
    )
    return LEDGER.page(rows, limit, LedgerEntryPublic.model_validate)

"""The economy at a glance: the earnings leaderboard (Redis) and the summary."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import FreshDep, PoolDep, RedisDep, SettingsDep
from api.schemas import (
    EconomySummary,
    FlowSummary,
    LeaderboardEntry,
    TierSummary,
    format_tokens,
)
from domain.economy import EconomyParameters
from projections import queries

router = APIRouter(tags=["economy"])


@router.get("/leaderboard", response_model=list[LeaderboardEntry])
async def leaderboard(
    settings: SettingsDep,
    redis: RedisDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> list[LeaderboardEntry]:
    """Accounts by rewards earned, highest first (the projector keeps it in Redis)."""
    key = f"{settings.redis_prefix}:leaderboard:earnings"
    entries = await redis.zrevrange(key, 0, limit - 1, withscores=True)
    return [
        LeaderboardEntry(
            rank=i + 1,
            account_id=member.decode() if isinstance(member, bytes) else str(member),
            earned=format_tokens(int(score)) or "0",
        )
        for i, (member, score) in enumerate(entries)
    ]


@router.get("/economy/summary", response_model=EconomySummary)
async def summary(
    settings: SettingsDep,
    pool: PoolDep,
    _fresh: FreshDep,
    bucket: Annotated[Literal["minute", "hour", "day"], Query()] = "hour",
) -> EconomySummary:
    """Supply, treasury, balances, staked (by tier), unstaking, in flight; rewards and
    slashes per bucket of time; the parameters in force."""
    s = await queries.economy_summary(pool, settings.db_schema, bucket=bucket)
    row = await queries.economy_parameters(pool, settings.db_schema)
    params = EconomyParameters.model_validate(row["params"]) if row else EconomyParameters()
    shown = params.model_dump(mode="json")
    shown["base_reward"] = format_tokens(params.base_reward)
    money = {
        k: format_tokens(s[k]) or "0"
        for k in ("supply", "treasury", "balances", "staked", "unstaking", "in_flight")
    }
    return EconomySummary(
        **money,
        accounts=s["accounts"],
        balanced=s["supply"] == s["balances"] + s["staked"] + s["unstaking"] + s["in_flight"],
        tiers=[
            TierSummary(
                tier=t["tier"], accounts=t["accounts"], staked=format_tokens(t["staked"]) or "0"
            )
            for t in s["tiers"]
        ],
        flows=[
            FlowSummary(
                at=f["at"],
                kind=f["kind"],
                amount=format_tokens(abs(f["amount"])) or "0",
                count=f["count"],
            )
            for f in s["flows"]
        ],
        parameters=shown,
    )

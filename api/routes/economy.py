"""The economy at a glance: the earnings leaderboard (Redis) and the summary."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from api.deps import FreshDep, ReadModelsDep, RedisDep, SettingsDep
from api.schemas.economy import EconomySummary, FlowSummary, LeaderboardEntry, TierSummary
from api.schemas.money import public_state
from domain.economy import EconomyParameters
from projections import queries
from projections.keys import RedisKeys

router = APIRouter(tags=["economy"])


@router.get("/leaderboard", response_model=list[LeaderboardEntry])
async def leaderboard(
    settings: SettingsDep,
    redis: RedisDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> list[LeaderboardEntry]:
    """Accounts by rewards earned, highest first (the projector keeps it in Redis)."""
    key = RedisKeys(settings.redis_prefix).leaderboard
    entries = await redis.zrevrange(key, 0, limit - 1, withscores=True)
    # withscores: each entry is a (member, score) pair
    pairs = [(entry[0], entry[1]) for entry in entries if not isinstance(entry, bytes | str)]
    return [
        LeaderboardEntry(
            rank=i + 1,
            account_id=member.decode() if isinstance(member, bytes) else str(member),
            earned=int(score),
        )
        for i, (member, score) in enumerate(pairs)
    ]


@router.get("/economy/summary", response_model=EconomySummary)
async def summary(
    read_models: ReadModelsDep,
    _fresh: FreshDep,
    bucket: Annotated[Literal["minute", "hour", "day"], Query()] = "hour",
) -> EconomySummary:
    """Supply, treasury, balances, staked (by tier), unstaking, in flight; rewards and
    slashes per bucket of time; the parameters in force."""
    s = await read_models(queries.economy_summary, bucket=bucket)
    row = await read_models(queries.economy_parameters)
    params = EconomyParameters.model_validate(row["params"]) if row else EconomyParameters()
    shown: dict[str, Any] = public_state(EconomyParameters, params.model_dump(mode="json")) or {}
    return EconomySummary(
        supply=s["supply"],
        treasury=s["treasury"],
        balances=s["balances"],
        staked=s["staked"],
        unstaking=s["unstaking"],
        in_flight=s["in_flight"],
        accounts=s["accounts"],
        balanced=s["supply"] == s["balances"] + s["staked"] + s["unstaking"] + s["in_flight"],
        tiers=[
            TierSummary(tier=t["tier"], accounts=t["accounts"], staked=t["staked"] or 0)
            for t in s["tiers"]
        ],
        flows=[
            FlowSummary(at=f["at"], kind=f["kind"], amount=abs(f["amount"]), count=f["count"])
            for f in s["flows"]
        ],
        parameters=shown,
    )

"""Economy policies: staking tiers, rewards, slashing and the governed parameters.

Everything is integers: amounts in micro-tokens (``MICRO`` per token), multipliers and
rates in basis points (10,000 bp = x1.0 = 100 %), quality in parts per million.

Tiers (by staked amount, inclusive lower bounds):

======== ============ ==========
tier     staked >=    multiplier
======== ============ ==========
none     0            x1.0
bronze   100 tokens   x1.0
silver   500 tokens   x1.2
gold     1,000 tokens x1.5
platinum 5,000 tokens x1.75
diamond  10,000 tokens x2.0
======== ============ ==========

The thresholds are fixed here (the Account decider emits ``TierChanged`` from them, so
changing them would need every account re-tiered); the multipliers, the base reward,
the slash rate and the unstake cooldown are governed (``EconomyParameters``) and read
by the rewards and slashing policies from the parameters in force.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from domain.messages import MICRO, Message
from domain.money import MicroTokens

Tier = Literal["none", "bronze", "silver", "gold", "platinum", "diamond"]
TIERS: tuple[Tier, ...] = ("none", "bronze", "silver", "gold", "platinum", "diamond")

TIER_THRESHOLDS: dict[Tier, int] = {
    "none": 0,
    "bronze": 100 * MICRO,
    "silver": 500 * MICRO,
    "gold": 1_000 * MICRO,
    "platinum": 5_000 * MICRO,
    "diamond": 10_000 * MICRO,
}

BP = 10_000
"""Basis points in one (x1.0 or 100 %)."""
PPM = 1_000_000
"""Parts per million in one (quality 1.0)."""

MAX_AMOUNT = 10**18
"""The largest amount any command may carry (micro-tokens): 10^12 tokens."""

TREASURY = "treasury"
"""The account id of the treasury: the issuer of every token (it mints its supply)."""


def tier_for(staked: int) -> Tier:
    """The tier of an account with ``staked`` micro-tokens staked."""
    current: Tier = "none"
    for tier in TIERS:
        if staked >= TIER_THRESHOLDS[tier]:
            current = tier
    return current


class TierMultipliers(Message):
    """Reward multiplier per tier, in basis points (10,000 = x1.0)."""

    none: int = Field(default=10_000, ge=0, le=100_000)
    bronze: int = Field(default=10_000, ge=0, le=100_000)
    silver: int = Field(default=12_000, ge=0, le=100_000)
    gold: int = Field(default=15_000, ge=0, le=100_000)
    platinum: int = Field(default=17_500, ge=0, le=100_000)
    diamond: int = Field(default=20_000, ge=0, le=100_000)

    def of(self, tier: Tier) -> int:
        """The multiplier of ``tier`` in basis points."""
        return int(getattr(self, tier))


SlashRateBp = Annotated[int, Field(ge=0, le=BP)]
"""The share of stake slashed when an agent loses a task it had started, in basis points."""

UnstakeCooldownS = Annotated[int, Field(ge=0, le=365 * 86_400)]
"""Seconds between an unstake request and its withdrawal (at most a year)."""


class EconomyParameters(Message):
    """The governed parameters of the economy.

    ``base_reward`` in micro-tokens per completed task; ``slash_rate_bp`` the share of
    stake slashed when an agent loses a task it had started (basis points);
    ``unstake_cooldown_s`` seconds between an unstake request and its withdrawal.
    """

    base_reward: MicroTokens = Field(default=10 * MICRO, ge=0, le=MAX_AMOUNT)
    multipliers: TierMultipliers = Field(default_factory=TierMultipliers)
    slash_rate_bp: SlashRateBp = 1_000
    unstake_cooldown_s: UnstakeCooldownS = 7 * 86_400


class ParameterChange(Message):
    """A change to some of the economy's parameters (None: unchanged)."""

    base_reward: MicroTokens | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    multipliers: TierMultipliers | None = None
    slash_rate_bp: SlashRateBp | None = None
    unstake_cooldown_s: UnstakeCooldownS | None = None

    def is_empty(self) -> bool:
        """True when the change changes nothing."""
        return all(getattr(self, f) is None for f in type(self).model_fields)

    def applied_to(self, params: EconomyParameters) -> EconomyParameters:
        """``params`` with this change applied."""
        update = {
            f: getattr(self, f) for f in type(self).model_fields if getattr(self, f) is not None
        }
        return params.model_copy(update=update)


def quality_ppm(quality: float) -> int:
    """A quality score in [0, 1] as parts per million, rounded half to even, clamped."""
    return max(0, min(PPM, round(quality * PPM)))


def reward_amount(params: EconomyParameters, tier: Tier, quality: float) -> int:
    """The reward for one completed task, in micro-tokens.

    ``base_reward x multiplier(tier) x quality``, computed in integers as
    ``base_reward * multiplier_bp * quality_ppm // (10_000 * 1_000_000)``: the quality is
    first rounded to parts per million (half to even), and the product is rounded down
    (floor) to the micro-token, so the treasury never pays a fraction it does not have
    and the same inputs always pay the same amount.
    """
    return params.base_reward * params.multipliers.of(tier) * quality_ppm(quality) // (BP * PPM)


def slash_amount(staked: int, rate_bp: int) -> int:
    """The slash of ``staked`` micro-tokens at ``rate_bp`` basis points, rounded down."""
    return staked * rate_bp // BP

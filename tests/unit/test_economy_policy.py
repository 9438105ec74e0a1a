"""Economy policies: tiers at their thresholds, reward and slash rounding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.economy import EconomyParameters, TierMultipliers, reward_amount, slash_amount, tier_for
from domain.messages import MICRO


@pytest.mark.parametrize(
    ("staked", "tier"),
    [
        (0, "none"),
        (100 * MICRO - 1, "none"),
        (100 * MICRO, "bronze"),
        (500 * MICRO, "silver"),
        (1_000 * MICRO - 1, "silver"),
        (1_000 * MICRO, "gold"),
        (5_000 * MICRO, "platinum"),
        (10_000 * MICRO, "diamond"),
        (10**18, "diamond"),
    ],
)
def test_tier_thresholds_are_inclusive(staked: int, tier: str) -> None:
    assert tier_for(staked) == tier


def test_reward_is_base_times_multiplier_times_quality_rounded_down() -> None:
    p = EconomyParameters(base_reward=10 * MICRO)
    assert reward_amount(p, "gold", 1.0) == 15 * MICRO
    assert reward_amount(p, "platinum", 0.5) == 8_750_000
    # 3 micro x 1.2 x 0.333333 = 1.1999988 -> 1
    assert reward_amount(EconomyParameters(base_reward=3), "silver", 1 / 3) == 1
    assert reward_amount(p, "diamond", 0.0) == 0


@given(
    base=st.integers(0, 10**12),
    quality=st.floats(0, 1),
    tier=st.sampled_from(["none", "bronze", "silver", "gold", "platinum", "diamond"]),
)
def test_reward_never_exceeds_the_exact_product(base: int, quality: float, tier: str) -> None:
    p = EconomyParameters(base_reward=base, multipliers=TierMultipliers())
    r = reward_amount(p, tier, quality)  # type: ignore[arg-type]
    assert 0 <= r <= base * 2


def test_slash_rounds_down() -> None:
    assert slash_amount(999, 1_000) == 99
    assert slash_amount(10 * MICRO, 10_000) == 10 * MICRO

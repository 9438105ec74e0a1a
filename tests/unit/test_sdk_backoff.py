"""Unit tests of sdk/backoff.py: the exponential schedule with equal jitter."""

from __future__ import annotations

import pytest

from sdk.backoff import Backoff, backoff_delay


def test_without_jitter_the_delay_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, base_s=0.5, cap_s=4.0, u=1.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_keeps_the_delay_between_half_and_all_of_the_ceiling() -> None:
    assert backoff_delay(3, base_s=1.0, cap_s=60.0, u=0.0) == 2.0
    assert backoff_delay(3, base_s=1.0, cap_s=60.0, u=0.5) == 3.0
    assert backoff_delay(3, base_s=1.0, cap_s=60.0, u=1.0) == 4.0


def test_attempt_zero_counts_as_the_first_and_huge_attempts_stay_at_the_cap() -> None:
    assert backoff_delay(0, base_s=0.5, u=1.0) == 0.5
    assert backoff_delay(100_000, base_s=0.5, cap_s=30.0, u=1.0) == 30.0


def test_a_jitter_draw_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError):
        backoff_delay(1, u=1.5)


def test_the_schedule_grows_and_resets_after_a_success() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_the_schedule_never_retries_immediately() -> None:
    backoff = Backoff(base_s=0.2, cap_s=5.0, rng=lambda: 0.0)
    assert all(backoff.next_delay() >= 0.1 for _ in range(20))

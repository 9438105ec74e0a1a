"""Reconnect and retry delays: capped exponential backoff with "equal jitter".

Source: Marc Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015.
The delay before retry ``n`` (1-based) is ``min(cap, base * factor ** (n - 1))`` scaled
by a factor in [0.5, 1.0]: never immediate, never synchronised across a swarm of agents
that all lost the API at the same moment.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


def backoff_delay(
    attempt: int,
    *,
    base_s: float = 0.5,
    cap_s: float = 30.0,
    factor: float = 2.0,
    u: float = 1.0,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based; 0 or less counts as 1).

    ``u`` in [0, 1] is the jitter draw (1.0 = no jitter, the ceiling itself); the result is
    ``ceiling * (0.5 + u / 2)`` with ``ceiling = min(cap_s, base_s * factor ** (attempt - 1))``.
    """
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"jitter draw u must be in [0, 1], got {u}")
    exponent = max(0, attempt - 1)
    try:
        ceiling = min(cap_s, base_s * factor**exponent)
    except OverflowError:  # attempt 10_000: the cap has long been reached
        ceiling = cap_s
    return ceiling * (0.5 + u / 2)


@dataclass
class Backoff:
    """A stateful backoff schedule: :meth:`next_delay` grows it, :meth:`reset` restarts it.

    Delays are in seconds. ``rng`` draws the jitter in [0, 1) (inject a constant in tests).
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    rng: Callable[[], float] = field(default=random.random, repr=False)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next retry, in seconds; counts one more attempt."""
        self.attempt += 1
        return backoff_delay(
            self.attempt, base_s=self.base_s, cap_s=self.cap_s, factor=self.factor, u=self.rng()
        )

    def reset(self) -> None:
        """Start again from the shortest delay (call after a success)."""
        self.attempt = 0

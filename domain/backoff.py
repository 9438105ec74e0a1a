"""Retry backoff: exponential with "full jitter" (AWS Architecture Blog, M. Brooker,
"Exponential Backoff And Jitter", 2015), made deterministic for replay.

The jitter is drawn from a hash of (key, attempt) rather than a random generator, so
deciding the same command twice gives the same delay (the domain has no randomness).
"""

from __future__ import annotations

import hashlib


def backoff_seconds(key: str, attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Delay in seconds before retry number ``attempt`` (1-based) of ``key``.

    ``min(cap_s, base_s * 2 ** (attempt - 1)) * u`` with ``u`` in [0.5, 1.0] taken from
    sha256(key:attempt): "equal jitter", so a retry never comes immediately.
    """
    # Cap the exponent before computing: 2 ** 1100 does not fit in a float.
    ceiling = min(cap_s, base_s * (2.0 ** min(max(0, attempt - 1), 64)))
    digest = hashlib.sha256(f"{key}:{attempt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return ceiling * (0.5 + u / 2)

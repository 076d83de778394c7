"""Retry delays: exponential with jitter, randomness passed in."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int,
    *,
    factor: float = 1.0,
    max_backoff: float = 60.0,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` ≥ 1): factor·2^(attempt−1), capped, ±jitter."""
    base = min(max_backoff, factor * 2 ** max(0, attempt - 1))
    spread = base * jitter
    return max(0.0, base + (rng or random).uniform(-spread, spread))

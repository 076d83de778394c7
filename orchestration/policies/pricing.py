"""What a task costs, from what it asks for. Pure; amounts are whole CPT, never floats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PriceList:
    """Coefficients in milli-CPT per minute (1000 = 1 CPT); see the README's price table."""

    base: int = 1000
    per_cpu_score: int = 1  # per point of cpu_score
    per_memory_gb: int = 250
    per_gpu_score: int = 2  # per point of gpu_score
    per_gpu_memory_gb: int = 500


def price_per_minute(needs: dict[str, int], prices: PriceList) -> int:
    """CPT per minute of run time (rounded up, at least 1)."""
    milli = (
        prices.base
        + prices.per_cpu_score * needs.get("cpu_score", 0)
        + prices.per_memory_gb * needs.get("memory_gb", 0)
        + prices.per_gpu_score * needs.get("gpu_score", 0)
        + prices.per_gpu_memory_gb * needs.get("gpu_memory_gb", 0)
    )
    return max(1, -(-milli // 1000))


def owed(per_minute: int, seconds: float) -> int:
    """CPT earned by ``seconds`` of metered run time at ``per_minute`` (rounded down)."""
    return int(per_minute * max(0.0, seconds) // 60)


def credit_after(credit: int, change: int, *, low: int = 0, high: int = 1000) -> int:
    return max(low, min(high, credit + change))

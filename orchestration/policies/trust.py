"""Trust tiers: how much the pool trusts a node, from its owner's credit and its Docker status.

A node is **high** tier when its owner's credit is at least ``high`` and Docker is enabled,
**normal** when the credit is in ``[normal, high)`` and Docker is enabled, and **low** otherwise.
Low-tier nodes only run work from submitters whose own credit is high enough (see
``orchestration.policies.matching.eligible``). Credit is always kept within ``[0, 1000]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CREDIT_MIN = 0
CREDIT_MAX = 1000

DOCKER_ENABLED = "enabled"
DOCKER_DISABLED = "disabled"

_ENABLED_WORDS = frozenset({"enabled", "available", "true", "yes", "on", "1"})
_DISABLED_WORDS = frozenset({"disabled", "unavailable", "false", "no", "off", "0", ""})


class Tier(enum.IntEnum):
    """A node's trust tier; sorting puts the most trusted first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @property
    def label(self) -> str:
        """The lower-case name used on the wire and in logs: ``"high"``, ``"normal"`` or ``"low"``."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class TrustThresholds:
    """Credit thresholds for the tiers and for letting low-tier nodes run a submitter's work."""

    high: int = 100
    normal: int = 50
    low_tier_min_submitter_credit: int = 100


def normalize_docker_status(raw: str) -> str:
    """Map a worker's Docker status to ``"enabled"`` or ``"disabled"``.

    Workers report ``enabled``/``disabled`` or ``available``/``unavailable``; ``true``/``false``,
    ``yes``/``no``, ``on``/``off`` and ``1``/``0`` are accepted too, in any case and with surrounding
    whitespace. An empty status means disabled.

    Raises:
        ValueError: the status is none of the above.
    """
    word = raw.strip().lower()
    if word in _ENABLED_WORDS:
        return DOCKER_ENABLED
    if word in _DISABLED_WORDS:
        return DOCKER_DISABLED
    raise ValueError(
        f"unknown Docker status {raw!r}: expected enabled/disabled, available/unavailable, "
        "true/false, yes/no, on/off or 1/0"
    )


def node_tier(credit: int, docker_enabled: bool, t: TrustThresholds) -> Tier:
    """The tier of a node whose owner has ``credit`` and whose Docker status is ``docker_enabled``."""
    if not docker_enabled or credit < t.normal:
        return Tier.LOW
    if credit >= t.high:
        return Tier.HIGH
    return Tier.NORMAL


def clamp_credit(value: int) -> int:
    """``value`` forced into the credit range ``[0, 1000]``."""
    return max(CREDIT_MIN, min(CREDIT_MAX, value))

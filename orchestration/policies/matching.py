"""Matching a task to a node: which nodes may take it, which is best, and why none can.

A node is *feasible* for a task when it is online, eligible for the submitter (a low-tier node
needs a trusted submitter), has at least the needed free amount in every resource dimension, has
a GPU whose name contains the asked name (empty or ``Any`` = no constraint) and is under its
optional task cap. Feasible nodes are ranked by tier (high first), then location match (when the
task asks for one), then lowest load; exact ties are broken at random so work is spread fairly.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass

from orchestration.policies.trust import Tier, TrustThresholds

DIMENSIONS = ("cpu_score", "memory_gb", "gpu_score", "gpu_memory_gb")


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each schedulable resource (a capacity, a free amount or a need)."""

    cpu_score: int
    memory_gb: int
    gpu_score: int
    gpu_memory_gb: int

    def fits_in(self, other: Resources) -> bool:
        """True when every dimension of ``self`` is at most the same dimension of ``other``."""
        return (
            self.cpu_score <= other.cpu_score
            and self.memory_gb <= other.memory_gb
            and self.gpu_score <= other.gpu_score
            and self.gpu_memory_gb <= other.gpu_memory_gb
        )

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_score + other.cpu_score,
            self.memory_gb + other.memory_gb,
            self.gpu_score + other.gpu_score,
            self.gpu_memory_gb + other.gpu_memory_gb,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_score - other.cpu_score,
            self.memory_gb - other.memory_gb,
            self.gpu_score - other.gpu_score,
            self.gpu_memory_gb - other.gpu_memory_gb,
        )

    def is_non_negative(self) -> bool:
        """True when no dimension is below zero."""
        return min(self.cpu_score, self.memory_gb, self.gpu_score, self.gpu_memory_gb) >= 0


@dataclass(frozen=True, slots=True)
class TaskNeeds:
    """What a task asks for, and the credit of the user who submitted it."""

    resources: Resources
    gpu_name: str = ""
    location: str = ""
    submitter_credit: int = 0


@dataclass(frozen=True, slots=True)
class NodeView:
    """The scheduler's snapshot of one node."""

    node_id: str
    tier: Tier
    online: bool
    capacity: Resources
    available: Resources
    gpu_name: str = ""
    location: str = ""
    running_tasks: int = 0
    max_tasks: int | None = None

    @property
    def load(self) -> float:
        """Allocated share of the most committed dimension, in ``[0, 1]`` for a consistent node.

        The maximum (not the mean) over dimensions with capacity > 0 of
        ``(capacity - available) / capacity``: the fullest dimension is the one that turns the
        next task away. 0.0 when no dimension has capacity.
        """
        worst = 0.0
        for name in DIMENSIONS:
            cap = getattr(self.capacity, name)
            if cap > 0:
                worst = max(worst, (cap - getattr(self.available, name)) / cap)
        return worst


class Rejection(enum.Enum):
    """Why a node cannot take a task; ``check`` tests the filters in this order."""

    OFFLINE = "offline"
    TRUST = "trust"
    CPU = "cpu_score"
    MEMORY = "memory_gb"
    GPU = "gpu_score"
    GPU_MEMORY = "gpu_memory_gb"
    GPU_NAME = "gpu_name"
    TASK_CAP = "task_cap"


def wants_any(value: str) -> bool:
    """True when a constraint is absent: empty or ``Any`` (any case)."""
    return value.strip().casefold() in ("", "any")


def gpu_matches(node_gpu: str, wanted: str) -> bool:
    """True when ``node_gpu`` contains ``wanted`` (case-insensitive) or nothing is wanted."""
    return wants_any(wanted) or wanted.strip().casefold() in node_gpu.casefold()


def location_matches(node_location: str, wanted: str) -> bool:
    """True when a location is wanted and the node is there (case-insensitive equality)."""
    return not wants_any(wanted) and node_location.strip().casefold() == wanted.strip().casefold()


def eligible(node_tier: Tier, submitter_credit: int, t: TrustThresholds) -> bool:
    """Whether a node of ``node_tier`` may run work from a submitter with ``submitter_credit``."""
    return node_tier != Tier.LOW or submitter_credit >= t.low_tier_min_submitter_credit


def check(node: NodeView, needs: TaskNeeds, t: TrustThresholds) -> Rejection | None:
    """The first filter ``node`` fails for ``needs``, in ``Rejection`` order; None when feasible."""
    if not node.online:
        return Rejection.OFFLINE
    if not eligible(node.tier, needs.submitter_credit, t):
        return Rejection.TRUST
    need, free = needs.resources, node.available
    if need.cpu_score > free.cpu_score:
        return Rejection.CPU
    if need.memory_gb > free.memory_gb:
        return Rejection.MEMORY
    if need.gpu_score > free.gpu_score:
        return Rejection.GPU
    if need.gpu_memory_gb > free.gpu_memory_gb:
        return Rejection.GPU_MEMORY
    if not gpu_matches(node.gpu_name, needs.gpu_name):
        return Rejection.GPU_NAME
    if node.max_tasks is not None and node.running_tasks >= node.max_tasks:
        return Rejection.TASK_CAP
    return None


def rank_key(node: NodeView, needs: TaskNeeds, tie_breaker: int) -> tuple[int, int, float, int]:
    """Sort key of a feasible node; smaller is better.

    Tier (high first), then location match first (no preference when the task wants any), then
    lowest load, then ``tie_breaker``.
    """
    far = 0 if wants_any(needs.location) or location_matches(node.location, needs.location) else 1
    return (int(node.tier), far, node.load, tie_breaker)


def choose(nodes: Iterable[NodeView], needs: TaskNeeds, t: TrustThresholds, *, rng: random.Random) -> NodeView | None:
    """The best feasible node by ``rank_key``, or None when no node is feasible.

    Scans every node once. Nodes with equal keys are equally likely to be chosen (reservoir
    sampling with ``rng``), so identical nodes share the work.
    """
    best: NodeView | None = None
    best_key: tuple[int, int, float, int] | None = None
    ties = 0
    for node in nodes:
        if check(node, needs, t) is not None:
            continue
        key = rank_key(node, needs, 0)
        if best_key is None or key < best_key:
            best, best_key, ties = node, key, 1
        elif key == best_key:
            ties += 1
            if rng.randrange(ties) == 0:
                best = node
    return best


def _count(n: int, noun: str = "node") -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _verb(n: int, singular: str, plural: str) -> str:
    return singular if n == 1 else plural


def explain_pending(nodes: Iterable[NodeView], needs: TaskNeeds, t: TrustThresholds) -> str:
    """Why no node can take the task, in words a submitter can act on; "" when some node can.

    Names a requirement no online node meets at all (for example "no online node has
    gpu_memory_gb ≥ 24"); otherwise counts nodes by what stops them, for example "3 nodes fit but
    are low tier and your credit is 60 (100 needed); 2 nodes lack free memory_gb ≥ 8".
    """
    fleet = list(nodes)
    if not fleet:
        return "no node is registered"
    online = [node for node in fleet if node.online]
    if not online:
        return "no node is online"
    need = needs.resources
    wanted_gpu = needs.gpu_name.strip()

    missing = [
        f"no online node has {name} ≥ {getattr(need, name)}"
        for name in DIMENSIONS
        if all(getattr(node.capacity, name) < getattr(need, name) for node in online)
    ]
    if not any(gpu_matches(node.gpu_name, needs.gpu_name) for node in online):
        missing.append(f"no online node has a GPU matching {wanted_gpu!r}")
    if missing:
        return "; ".join(missing)

    # Judge resources apart from trust, so "fits but is low tier" can be said.
    as_trusted = TaskNeeds(need, needs.gpu_name, needs.location, t.low_tier_min_submitter_credit)
    blocked: dict[Rejection, int] = {}
    for node in online:
        reason = check(node, as_trusted, t)
        if reason is None and not eligible(node.tier, needs.submitter_credit, t):
            reason = Rejection.TRUST
        if reason is None:
            return ""
        blocked[reason] = blocked.get(reason, 0) + 1

    parts: list[str] = []
    for reason in Rejection:
        n = blocked.get(reason, 0)
        if n == 0 or reason is Rejection.OFFLINE:
            continue
        nodes_fit, are = f"{_count(n)} {_verb(n, 'fits', 'fit')}", _verb(n, "is", "are")
        if reason is Rejection.TRUST:
            credit, needed = needs.submitter_credit, t.low_tier_min_submitter_credit
            parts.append(f"{nodes_fit} but {are} low tier and your credit is {credit} ({needed} needed)")
        elif reason is Rejection.GPU_NAME:
            parts.append(f"{_count(n)} {_verb(n, 'has', 'have')} no GPU matching {wanted_gpu!r}")
        elif reason is Rejection.TASK_CAP:
            parts.append(f"{nodes_fit} but {are} at {_verb(n, 'its', 'their')} task limit")
        else:
            parts.append(f"{_count(n)} lack{_verb(n, 's', '')} free {reason.value} ≥ {getattr(need, reason.value)}")
    offline = len(fleet) - len(online)
    if offline:
        parts.append(f"{_count(offline)} {_verb(offline, 'is', 'are')} offline")
    return "; ".join(parts)

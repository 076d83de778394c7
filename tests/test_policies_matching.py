"""Feasibility, ranking, fairness and "why pending", as tables over small fleets."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from orchestration.policies import (
    NodeView,
    Rejection,
    Resources,
    TaskNeeds,
    Tier,
    TrustThresholds,
    check,
    choose,
    explain_pending,
    gpu_matches,
    rank_key,
    wants_any,
)

T = TrustThresholds()
BIG = Resources(1000, 64, 1000, 48)


def node(node_id: str = "n", **changes: Any) -> NodeView:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "tier": Tier.HIGH,
        "online": True,
        "capacity": BIG,
        "available": BIG,
        "gpu_name": "NVIDIA A100",
    }
    fields.update(changes)
    return NodeView(**fields)


def needs(cpu: int = 0, mem: int = 0, gpu: int = 0, gpu_mem: int = 0, **changes: Any) -> TaskNeeds:
    return TaskNeeds(Resources(cpu, mem, gpu, gpu_mem), **{"submitter_credit": 50, **changes})


@pytest.mark.parametrize(
    ("need", "free", "fits"),
    [
        (Resources(1, 1, 1, 1), Resources(1, 1, 1, 1), True),
        (Resources(0, 0, 0, 0), Resources(0, 0, 0, 0), True),
        (Resources(2, 1, 1, 1), Resources(1, 1, 1, 1), False),
        (Resources(1, 2, 1, 1), Resources(1, 1, 1, 1), False),
        (Resources(1, 1, 2, 1), Resources(1, 1, 1, 1), False),
        (Resources(1, 1, 1, 2), Resources(1, 1, 1, 1), False),
        (Resources(1, 1, 0, 0), Resources(9, 9, 0, 0), True),
    ],
)
def test_fits_in_every_dimension(need: Resources, free: Resources, fits: bool) -> None:
    assert need.fits_in(free) is fits


def test_resources_arithmetic() -> None:
    a, b = Resources(4, 8, 2, 16), Resources(1, 2, 3, 4)
    assert a - b == Resources(3, 6, -1, 12)
    assert (a - b) + b == a
    assert a.is_non_negative()
    assert not (a - b).is_non_negative()


@pytest.mark.parametrize(
    ("value", "any_"), [("", True), ("any", True), ("Any", True), (" ANY ", True), ("a100", False), ("anyx", False)]
)
def test_empty_or_any_means_no_constraint(value: str, any_: bool) -> None:
    assert wants_any(value) is any_


@pytest.mark.parametrize(
    ("node_gpu", "wanted", "matches"),
    [
        ("NVIDIA A100", "a100", True),
        ("NVIDIA A100", "A100", True),
        ("nvidia a100", "NVIDIA A100", True),
        ("NVIDIA A100", "Any", True),
        ("NVIDIA A100", "", True),
        ("", "", True),
        ("", "any", True),
        ("", "A100", False),
        ("RTX 4090", "rtx", True),
        ("RTX 4090", "A100", False),
        ("A10", "A100", False),
    ],
)
def test_gpu_name_is_a_case_insensitive_substring(node_gpu: str, wanted: str, matches: bool) -> None:
    assert gpu_matches(node_gpu, wanted) is matches


@pytest.mark.parametrize(
    ("candidate", "task", "reason"),
    [
        (node(), needs(10, 1, 10, 8), None),
        (node(online=False, tier=Tier.LOW, available=Resources(0, 0, 0, 0)), needs(10), Rejection.OFFLINE),
        (node(tier=Tier.LOW, available=Resources(0, 0, 0, 0)), needs(10), Rejection.TRUST),
        (node(tier=Tier.LOW), needs(10, submitter_credit=100), None),
        (node(available=Resources(5, 0, 0, 0), gpu_name=""), needs(10, 1, 1, 1, gpu_name="a100"), Rejection.CPU),
        (node(available=Resources(10, 0, 0, 0), gpu_name=""), needs(10, 1, 1, 1, gpu_name="x"), Rejection.MEMORY),
        (node(available=Resources(10, 1, 0, 0), gpu_name=""), needs(10, 1, 1, 1, gpu_name="x"), Rejection.GPU),
        (node(available=Resources(10, 1, 1, 0), gpu_name=""), needs(10, 1, 1, 1, gpu_name="x"), Rejection.GPU_MEMORY),
        (node(gpu_name="RTX 4090", running_tasks=2, max_tasks=2), needs(gpu_name="A100"), Rejection.GPU_NAME),
        (node(running_tasks=2, max_tasks=2), needs(10), Rejection.TASK_CAP),
        (node(running_tasks=1, max_tasks=2), needs(10), None),
    ],
)
def test_check_reports_the_first_failing_filter(candidate: NodeView, task: TaskNeeds, reason: Rejection | None) -> None:
    assert check(candidate, task, T) is reason


@pytest.mark.parametrize(
    ("available", "load"),
    [
        (BIG, 0.0),
        (Resources(500, 64, 1000, 48), 0.5),
        (Resources(900, 16, 1000, 48), 0.75),  # the fullest dimension, not the mean
        (Resources(0, 0, 0, 0), 1.0),
    ],
)
def test_load_is_the_fullest_dimension(available: Resources, load: float) -> None:
    assert node(available=available).load == load


def test_load_of_a_node_without_capacity_is_zero() -> None:
    nothing = Resources(0, 0, 0, 0)
    assert node(capacity=nothing, available=nothing).load == 0.0


HALF = Resources(500, 32, 500, 24)


@pytest.mark.parametrize(
    ("fleet", "task", "winner"),
    [
        # tier beats location and load
        ([node("near-normal", tier=Tier.NORMAL, location="eu"), node("far-high", location="us", available=HALF)],
         needs(location="eu"), "far-high"),
        # location beats load
        ([node("near-busy", location="EU", available=HALF), node("far-idle", location="us")],
         needs(location="eu"), "near-busy"),
        # lowest load
        ([node("busy", available=HALF), node("idle")], needs(), "idle"),
        # "Any" location is no preference: load decides
        ([node("near-busy", location="eu", available=HALF), node("far-idle", location="us")],
         needs(location="Any"), "far-idle"),
        # low tier only for a trusted submitter, and still ranked last
        ([node("low", tier=Tier.LOW), node("normal", tier=Tier.NORMAL, available=HALF)],
         needs(submitter_credit=100), "normal"),
        ([node("low", tier=Tier.LOW), node("offline", online=False)], needs(submitter_credit=100), "low"),
    ],
)  # fmt: skip
def test_choose_ranks_tier_then_location_then_load(fleet: list[NodeView], task: TaskNeeds, winner: str) -> None:
    chosen = choose(fleet, task, T, rng=random.Random(1))
    assert chosen is not None and chosen.node_id == winner


def test_rank_key_orders_tier_location_load_tie_breaker() -> None:
    task = needs(location="eu")
    assert rank_key(node(location="eu", available=HALF), task, 7) == (0, 0, 0.5, 7)
    assert rank_key(node(tier=Tier.LOW, location="us"), task, 0) == (2, 1, 0.0, 0)


def test_choose_returns_none_when_nothing_is_feasible() -> None:
    fleet = [node("low", tier=Tier.LOW), node("off", online=False)]
    assert choose(fleet, needs(submitter_credit=60), T, rng=random.Random(1)) is None
    assert choose([], needs(), T, rng=random.Random(1)) is None


def test_identical_best_nodes_share_the_work() -> None:
    fleet = [node("a"), node("b"), node("c"), node("busy", available=HALF), node("low", tier=Tier.NORMAL)]
    rng = random.Random(42)
    picks = Counter(chosen.node_id for _ in range(300) if (chosen := choose(fleet, needs(), T, rng=rng)))
    assert set(picks) == {"a", "b", "c"}
    assert min(picks.values()) >= 50


@pytest.mark.parametrize(
    ("fleet", "task", "expected"),
    [
        ([], needs(), "no node is registered"),
        ([node(online=False), node("b", online=False)], needs(), "no node is online"),
        ([node(capacity=Resources(1000, 64, 1000, 16), available=Resources(1000, 64, 1000, 16))],
         needs(gpu_mem=24), "no online node has gpu_memory_gb ≥ 24"),
        ([node(gpu_name="RTX 4090"), node("b", gpu_name="")], needs(gpu_name="H100"),
         "no online node has a GPU matching 'H100'"),
        ([node("a", tier=Tier.LOW), node("b", tier=Tier.LOW), node("c", tier=Tier.LOW)], needs(submitter_credit=60),
         "3 nodes fit but are low tier and your credit is 60 (100 needed)"),
        ([node("a", tier=Tier.LOW), node("b", available=Resources(1000, 4, 1000, 48)), node("c", online=False)],
         needs(mem=8, submitter_credit=60),
         "1 node fits but is low tier and your credit is 60 (100 needed); 1 node lacks free memory_gb ≥ 8; "
         "1 node is offline"),
        ([node("a", available=HALF), node("b", available=HALF)], needs(cpu=600),
         "2 nodes lack free cpu_score ≥ 600"),
        ([node("a", running_tasks=3, max_tasks=3), node("b", gpu_name="RTX 4090")], needs(gpu_name="a100"),
         "1 node has no GPU matching 'a100'; 1 node fits but is at its task limit"),
        ([node("a", tier=Tier.LOW), node("b")], needs(submitter_credit=60), ""),
    ],
)  # fmt: skip
def test_explain_pending_says_what_to_change(fleet: list[NodeView], task: TaskNeeds, expected: str) -> None:
    assert explain_pending(fleet, task, T) == expected


def test_explain_pending_is_empty_exactly_when_choose_finds_a_node() -> None:
    rng = random.Random(3)
    for _ in range(200):
        fleet = [
            node(
                str(i),
                tier=rng.choice(list(Tier)),
                online=rng.random() < 0.8,
                available=Resources(*(rng.randint(0, v) for v in (1000, 64, 1000, 48))),
                gpu_name=rng.choice(["", "RTX 4090", "NVIDIA A100"]),
            )
            for i in range(rng.randint(0, 4))
        ]
        task = needs(rng.randint(0, 900), rng.randint(0, 60), gpu_name=rng.choice(["", "a100"]), submitter_credit=60)
        assert (explain_pending(fleet, task, T) == "") == (choose(fleet, task, T, rng=rng) is not None)

"""The candidate index gives the same answer class as the linear scan, and stays consistent."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import astuple, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.policies import (
    CandidateIndex,
    NodeView,
    Resources,
    TaskNeeds,
    Tier,
    TrustThresholds,
    check,
    choose,
    load_bin,
    rank_key,
)

T = TrustThresholds()
GPUS = ["", "RTX 4090", "NVIDIA A100", "a100x"]
LOCATIONS = ["", "eu", "EU ", "us"]


small = st.integers(0, 8)
node_fields = st.tuples(
    st.tuples(small, small, small, small),  # capacity
    st.tuples(small, small, small, small) | st.just((0, 0, 0, 0)),  # used, capped at capacity
    st.sampled_from(Tier),
    st.booleans() | st.just(True),
    st.sampled_from(GPUS),
    st.sampled_from(LOCATIONS),
    st.integers(0, 3),
    st.none() | st.integers(1, 3),
)


def make_node(node_id: str, fields: tuple[Any, ...]) -> NodeView:
    capacity_, used_, tier, online, gpu_name, location, running, cap = fields
    capacity = Resources(*capacity_)
    used = Resources(*(min(u, c) for u, c in zip(used_, capacity_, strict=True)))
    return NodeView(node_id, tier, online, capacity, capacity - used, gpu_name, location, running, cap)


fleets = st.lists(node_fields, min_size=1, max_size=60).map(
    lambda rows: [make_node(f"n{i}", row) for i, row in enumerate(rows)]
)


needs_st = st.builds(
    TaskNeeds,
    resources=st.builds(Resources, *(st.sampled_from([0, 0, 0, 1, 2, 4]) for _ in range(4))),
    gpu_name=st.sampled_from(["", "", "Any", "a100", "RTX", "h100"]),
    location=st.sampled_from(["", "any", "eu", "us", "ap"]),
    submitter_credit=st.sampled_from([0, 60, 100, 200]),
)


def class_of(node: NodeView, needs: TaskNeeds) -> tuple[int, int, int]:
    tier, far, load, _ = rank_key(node, needs, 0)
    return tier, far, load_bin(load)


def assert_same_answer_class(index: CandidateIndex, fleet: list[NodeView], needs: TaskNeeds, seed: int) -> None:
    best = choose(fleet, needs, T, rng=random.Random(seed))
    chosen = index.choose(needs, T, rng=random.Random(seed))
    assert (chosen is None) == (best is None)
    if chosen is not None and best is not None:
        assert check(chosen, needs, T) is None
        assert class_of(chosen, needs) == class_of(best, needs)


@settings(max_examples=300, deadline=None)
@given(fleet=fleets, needs=needs_st, seed=st.integers(0, 2**16))
def test_index_chooses_like_the_linear_scan(fleet: list[NodeView], needs: TaskNeeds, seed: int) -> None:
    assert_same_answer_class(CandidateIndex(fleet), fleet, needs, seed)


@settings(max_examples=200, deadline=None)
@given(fleet=fleets, needs=needs_st, limit=st.integers(1, 20))
def test_candidates_are_feasible_distinct_and_in_rank_order(
    fleet: list[NodeView], needs: TaskNeeds, limit: int
) -> None:
    found = CandidateIndex(fleet).candidates(needs, T, limit)
    feasible = [node for node in fleet if check(node, needs, T) is None]
    assert len(found) == min(limit, len(feasible))
    assert len({node.node_id for node in found}) == len(found)
    assert all(check(node, needs, T) is None for node in found)
    classes = [class_of(node, needs) for node in found]
    assert classes == sorted(classes)
    if found:
        assert classes[0] == min(class_of(node, needs) for node in feasible)


operations = st.lists(
    st.tuples(st.sampled_from(["upsert", "remove"]), st.integers(0, 15), st.data()),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(steps=operations, needs=needs_st)
def test_upsert_and_remove_keep_the_index_consistent(
    steps: list[tuple[str, int, st.DataObject]], needs: TaskNeeds
) -> None:
    index, model = CandidateIndex(), {}
    for op, n, data in steps:
        node_id = f"n{n}"
        if op == "upsert":
            node = make_node(node_id, data.draw(node_fields))
            index.upsert(node)
            model[node_id] = node
        else:
            assert index.remove(node_id) == (node_id in model)
            model.pop(node_id, None)
        assert len(index) == len(model)
    for n in range(16):
        assert index.get(f"n{n}") == model.get(f"n{n}")
        assert (f"n{n}" in index) == (f"n{n}" in model)
    fleet = list(model.values())
    assert_same_answer_class(index, fleet, needs, seed=0)
    assert len(index.candidates(needs, T, 100)) == sum(check(node, needs, T) is None for node in fleet)


def random_fleet(rng: random.Random, size: int) -> list[NodeView]:
    fleet = []
    for i in range(size):
        big = rng.random() < 0.02
        capacity = Resources(rng.randint(100, 4000), rng.choice((4, 16, 64)), 5000 if big else 0, 40 if big else 0)
        used = Resources(*(int(v * rng.random() ** 2) for v in (capacity.cpu_score, capacity.memory_gb, 0, 0)))
        fleet.append(
            NodeView(
                node_id=f"n{i}",
                tier=rng.choice(list(Tier)),
                online=rng.random() < 0.9,
                capacity=capacity,
                available=capacity - used,
                gpu_name=rng.choice(["NVIDIA A100", "H100"]) if big else "",
                location=rng.choice(["eu", "us", "ap"]),
            )
        )
    return fleet


def test_large_fleet_agrees_with_the_scan_for_typical_and_selective_tasks() -> None:
    # Large enough that buckets are sampled rather than scanned.
    rng = random.Random(11)
    fleet = random_fleet(rng, 4000)
    index = CandidateIndex(fleet)
    tasks = [
        TaskNeeds(Resources(200, 2, 0, 0), submitter_credit=60),
        TaskNeeds(Resources(200, 2, 0, 0), location="ap", submitter_credit=100),
        TaskNeeds(Resources(100, 1, 1, 24), submitter_credit=60),
        TaskNeeds(Resources(100, 1, 1, 24), gpu_name="a100", location="us", submitter_credit=60),
        TaskNeeds(Resources(100, 1, 1, 48), submitter_credit=100),
    ]
    for seed, needs in enumerate(tasks * 20):
        assert_same_answer_class(index, fleet, needs, seed)


def test_many_random_small_fleets_agree_with_the_scan() -> None:
    rng = random.Random(2024)
    amounts = (0, 0, 0, 1, 2, 4)
    for seed in range(1500):
        fleet = []
        for i in range(rng.randint(1, 80)):
            capacity = Resources(*(rng.randint(0, 8) for _ in range(4)))
            used = Resources(*(rng.randint(0, v) if rng.random() < 0.7 else 0 for v in astuple(capacity)))
            cap = rng.choice([None, None, 2])
            tier = rng.choice(list(Tier))
            fleet.append(
                NodeView(f"n{i}", tier, rng.random() < 0.9, capacity, capacity - used, rng.choice(GPUS),
                         rng.choice(LOCATIONS), rng.randint(0, 2), cap)
            )  # fmt: skip
        needs = TaskNeeds(
            Resources(*(rng.choice(amounts) for _ in range(4))),
            gpu_name=rng.choice(["", "", "any", "a100", "rtx"]),
            location=rng.choice(["", "eu", "us", "ap"]),
            submitter_credit=rng.choice([60, 100]),
        )
        assert_same_answer_class(CandidateIndex(fleet), fleet, needs, seed)


def test_a_wanted_location_is_a_preference_not_a_filter() -> None:
    full = Resources(100, 8, 0, 0)
    here = NodeView("here", Tier.NORMAL, True, full, Resources(10, 1, 0, 0), location="EU")
    there = NodeView("there", Tier.NORMAL, True, full, full, location="us")
    higher_there = NodeView("higher", Tier.HIGH, True, full, Resources(10, 1, 0, 0), location="ap")
    rng = random.Random(0)
    wants_eu = TaskNeeds(Resources(5, 1, 0, 0), location="eu")
    assert CandidateIndex([here, there]).choose(wants_eu, T, rng=rng) == here
    assert CandidateIndex([here, there, higher_there]).choose(wants_eu, T, rng=rng) == higher_there
    too_big_here = TaskNeeds(Resources(50, 1, 0, 0), location="eu")
    assert CandidateIndex([here, there]).choose(too_big_here, T, rng=rng) == there
    assert [n.node_id for n in CandidateIndex([here, there]).candidates(wants_eu, T, 5)] == ["here", "there"]


def test_index_shares_ties_fairly() -> None:
    full = Resources(100, 8, 0, 0)
    twins = [NodeView(f"twin{i}", Tier.HIGH, True, full, full) for i in range(3)]
    busier = NodeView("busier", Tier.HIGH, True, full, Resources(10, 1, 0, 0))
    index = CandidateIndex([*twins, busier])
    rng = random.Random(5)
    needs = TaskNeeds(Resources(1, 1, 0, 0))
    picks = Counter(chosen.node_id for _ in range(300) if (chosen := index.choose(needs, T, rng=rng)))
    assert set(picks) == {"twin0", "twin1", "twin2"}
    assert min(picks.values()) >= 50


def test_ties_stay_fair_when_most_of_a_bucket_does_not_fit() -> None:
    # Each decoy has enough of one dimension but not the other, so random draws mostly miss.
    twins = [NodeView(f"twin{i}", Tier.HIGH, True, Resources(100, 8, 0, 0), Resources(100, 8, 0, 0)) for i in range(3)]
    cpu_only = [
        NodeView(f"c{i}", Tier.HIGH, True, Resources(100, 1, 0, 0), Resources(100, 1, 0, 0)) for i in range(500)
    ]
    mem_only = [NodeView(f"m{i}", Tier.HIGH, True, Resources(10, 8, 0, 0), Resources(10, 8, 0, 0)) for i in range(500)]
    index = CandidateIndex([*cpu_only, *twins, *mem_only])
    rng = random.Random(9)
    needs = TaskNeeds(Resources(50, 4, 0, 0))
    picks = Counter(chosen.node_id for _ in range(300) if (chosen := index.choose(needs, T, rng=rng)))
    assert set(picks) == {"twin0", "twin1", "twin2"}
    assert min(picks.values()) >= 50


def test_a_node_that_fills_up_moves_out_of_the_way() -> None:
    full = Resources(100, 8, 0, 0)
    index = CandidateIndex([NodeView("a", Tier.HIGH, True, full, full), NodeView("b", Tier.NORMAL, True, full, full)])
    needs = TaskNeeds(Resources(60, 1, 0, 0))
    first = index.choose(needs, T, rng=random.Random(0))
    assert first is not None and first.node_id == "a"
    index.upsert(replace(first, available=first.available - needs.resources, running_tasks=1))
    second = index.choose(needs, T, rng=random.Random(0))
    assert second is not None and second.node_id == "b"
    index.upsert(replace(first, online=False))
    assert index.get("a") is not None
    index.remove("b")
    assert index.choose(needs, T, rng=random.Random(0)) is None

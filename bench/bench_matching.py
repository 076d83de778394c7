"""Time one matching decision: ``CandidateIndex.choose`` against a linear scan (``matching.choose``).

Run: ``.venv/bin/python bench/bench_matching.py [--sizes 1000 10000 100000] [--seed 7]``

Builds random fleets and reports the median microseconds per decision for each kind of task,
plus the median cost of re-indexing one node after an allocation (``upsert``). The scan baseline
is measured in the same run over the same nodes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from orchestration.policies import CandidateIndex, NodeView, Resources, TaskNeeds, Tier, TrustThresholds, choose

LOCATIONS = ("eu-west", "eu-east", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south")
BIG_GPUS = ("NVIDIA A100", "NVIDIA H100", "RTX 4090")
SMALL_GPUS = ("RTX 3060", "GTX 1080", "RTX 2070")

CASES = {
    "typical": TaskNeeds(Resources(300, 2, 0, 0), submitter_credit=60),
    "typical+location": TaskNeeds(Resources(300, 2, 0, 0), location="eu-west", submitter_credit=60),
    "selective gpu>=24GB": TaskNeeds(Resources(100, 2, 1, 24), submitter_credit=60),
    "selective 'a100'": TaskNeeds(Resources(100, 2, 1, 16), gpu_name="a100", submitter_credit=60),
}


def random_node(i: int, rng: random.Random) -> NodeView:
    """One node; about 1% have a GPU with 24 GB or more, 30% a small GPU, the rest none."""
    roll = rng.random()
    if roll < 0.01:
        gpu_name, gpu_score, gpu_memory = rng.choice(BIG_GPUS), rng.randint(5000, 20000), rng.choice((24, 40, 80))
    elif roll < 0.31:
        gpu_name, gpu_score, gpu_memory = rng.choice(SMALL_GPUS), rng.randint(1000, 5000), rng.choice((4, 8, 12))
    else:
        gpu_name, gpu_score, gpu_memory = "", 0, 0
    capacity = Resources(rng.randint(500, 4000), rng.choice((4, 8, 16, 32, 64)), gpu_score, gpu_memory)
    used = Resources(*(int(v * rng.random() ** 2) for v in (capacity.cpu_score, capacity.memory_gb, gpu_score, 0)))
    return NodeView(
        node_id=f"node-{i}",
        tier=rng.choices(list(Tier), weights=(25, 45, 30))[0],
        online=rng.random() < 0.95,
        capacity=capacity,
        available=capacity - used,
        gpu_name=gpu_name,
        location=rng.choice(LOCATIONS),
        running_tasks=rng.randint(0, 3),
        max_tasks=rng.choice((None, None, None, 4)),
    )


def median_us(action: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        action()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def bench_fleet(size: int, seed: int) -> dict[str, tuple[float, float]]:
    """Median µs per decision for each case on one random fleet: (index, linear scan)."""
    t = TrustThresholds()
    rng = random.Random(seed)
    nodes = [random_node(i, rng) for i in range(size)]
    built = time.perf_counter()
    index = CandidateIndex(nodes)
    build_s = time.perf_counter() - built
    results: dict[str, tuple[float, float]] = {}
    for name, needs in CASES.items():
        assert (index.choose(needs, t, rng=rng) is None) == (choose(nodes, needs, t, rng=rng) is None)
        indexed = median_us(partial(index.choose, needs, t, rng=rng), 2000)
        scanned = median_us(partial(choose, nodes, needs, t, rng=rng), max(5, 2_000_000 // size))
        results[name] = (indexed, scanned)
        print(f"{size:>8}  {name:<20} {indexed:>9.1f} {scanned:>10.1f} {scanned / indexed:>7.0f}x", flush=True)

    def reindex_one() -> None:
        node = nodes[rng.randrange(size)]
        index.upsert(replace(node, available=node.capacity - Resources(100, 1, 0, 0)))

    print(f"{size:>8}  {'upsert (reindex)':<20} {median_us(reindex_one, 2000):>9.1f}   (build {build_s:.2f} s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{'nodes':>8}  {'task':<20} {'index µs':>9} {'scan µs':>10} {'speedup':>8}")
    by_size = {size: bench_fleet(size, args.seed) for size in args.sizes}
    for name in CASES:
        steps = [
            f"{small:,}→{big:,}: x{by_size[big][name][0] / by_size[small][name][0]:.2f}"
            for small, big in zip(args.sizes, args.sizes[1:], strict=False)
        ]
        if steps:
            print(f"index cost growth, {name}: {', '.join(steps)}")


if __name__ == "__main__":
    main()

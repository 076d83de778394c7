"""A candidate index: the same choice as ``matching.choose`` without scanning every node.

Design
------
Nodes that could ever be feasible (online and under their task cap) are kept in buckets keyed by
``(tier, load bin)``, with ``LOAD_BINS`` equal-width bins of ``NodeView.load``. Each bucket holds:

* for each resource dimension, a list of ``(free amount, node_id)`` kept sorted (``bisect``), so
  the nodes with enough of one dimension are a suffix found in O(log m), and the bucket's maximum
  is its last entry;
* the node ids grouped by location and by GPU name (case-folded), each group a bag with O(1) add,
  remove and random pick.

A decision walks tiers best first (skipping low tier for a submitter it may not serve), and
within a tier, when the task asks for a location, first every bin restricted to that location,
then every bin restricted to the other locations; bins are walked lowest load first. A bucket
whose largest free amount in some dimension (kept per bucket) is below the need is skipped in
O(1). Otherwise its *pool* is the smallest of: the suffixes of the dimensions the task needs, the
union of the GPU groups whose name contains the asked GPU, and the asked location's group. Each
of these is a superset of the bucket's feasible nodes. Up to ``min(pool size, SAMPLES)`` uniform
draws from the pool are verified with ``matching.check``; if all miss, the pool is scanned and
one feasible node is drawn. Both steps are uniform over the bucket's feasible nodes, so ties are
broken fairly.

The answer class matches ``matching.choose``: the best tier, then the location preference, then
the lowest *load bin* (within a bin any feasible node may be picked, uniformly at random).

Complexity, with B = 3 tiers x 2 location passes x ``LOAD_BINS`` buckets (a constant) and m
nodes in a bucket: a decision costs O(B log m) plus the draws, and a draw succeeds with
probability (feasible in pool) / (pool size). When one dimension, the GPU name or the location
is what makes nodes infeasible, the pool is close to exactly the feasible set and a decision is a
handful of draws, whatever the fleet size. The slow case is a combination of filters that each
pass most nodes but together pass almost none: then the pool of a bucket is scanned, O(m).
``upsert`` and ``remove`` cost O(log m) searches plus list insertion/deletion (O(m) memory moves,
fast in practice).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator

from orchestration.policies.id_sets import Bag, Suffix, Union
from orchestration.policies.matching import NodeView, TaskNeeds, check, eligible, gpu_matches, wants_any
from orchestration.policies.trust import Tier, TrustThresholds

LOAD_BINS = 20
SAMPLES = 24

_ANY, _HERE, _ELSEWHERE = 0, 1, 2  # location rule of one pass over a tier


def load_bin(load: float) -> int:
    """The bin, 0 (idle) to ``LOAD_BINS - 1`` (full), that a node with ``load`` belongs to."""
    return min(LOAD_BINS - 1, max(0, int(load * LOAD_BINS)))


def _free(node: NodeView) -> tuple[int, int, int, int]:
    a = node.available
    return (a.cpu_score, a.memory_gb, a.gpu_score, a.gpu_memory_gb)


def _location_key(location: str) -> str:
    return location.strip().casefold()


class _Query:
    """One task's needs, prepared once per decision."""

    __slots__ = ("amounts", "gpu_keys", "location", "needed", "needs", "t")

    def __init__(self, needs: TaskNeeds, t: TrustThresholds, gpu_names: Iterable[str]) -> None:
        self.needs, self.t = needs, t
        r = needs.resources
        self.amounts = (r.cpu_score, r.memory_gb, r.gpu_score, r.gpu_memory_gb)
        self.needed = [(d, amount) for d, amount in enumerate(self.amounts) if amount > 0]
        self.gpu_keys = None if wants_any(needs.gpu_name) else [k for k in gpu_names if gpu_matches(k, needs.gpu_name)]
        self.location = "" if wants_any(needs.location) else _location_key(needs.location)

    def rules(self) -> tuple[int, ...]:
        return (_HERE, _ELSEWHERE) if self.location else (_ANY,)

    def accepts(self, node: NodeView, rule: int) -> bool:
        if check(node, self.needs, self.t) is not None:
            return False
        if rule == _ANY:
            return True
        return (_location_key(node.location) == self.location) == (rule == _HERE)


class _Bucket:
    """The indexed nodes of one (tier, load bin)."""

    __slots__ = ("by_dim", "by_gpu", "by_location", "nodes", "top")

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.by_dim: tuple[list[tuple[int, str]], ...] = ([], [], [], [])
        self.by_location: dict[str, Bag] = {}
        self.by_gpu: dict[str, Bag] = {}
        self.top: tuple[int, ...] | None = None  # largest free amount per dimension; None when empty

    def _retop(self) -> None:
        self.top = tuple(entries[-1][0] for entries in self.by_dim) if self.nodes else None

    def could_fit(self, amounts: tuple[int, int, int, int]) -> bool:
        """False when some dimension's largest free amount is below the need (or the bucket is empty)."""
        top = self.top
        return (
            top is not None
            and top[0] >= amounts[0]
            and top[1] >= amounts[1]
            and top[2] >= amounts[2]
            and top[3] >= amounts[3]
        )

    def add(self, node: NodeView) -> None:
        self.nodes[node.node_id] = node
        for entries, amount in zip(self.by_dim, _free(node), strict=True):
            insort(entries, (amount, node.node_id))
        self.by_location.setdefault(_location_key(node.location), Bag()).add(node.node_id)
        self.by_gpu.setdefault(node.gpu_name.casefold(), Bag()).add(node.node_id)
        self._retop()

    def remove(self, node: NodeView) -> None:
        del self.nodes[node.node_id]
        for entries, amount in zip(self.by_dim, _free(node), strict=True):
            del entries[bisect_left(entries, (amount, node.node_id))]
        for groups, key in ((self.by_location, _location_key(node.location)), (self.by_gpu, node.gpu_name.casefold())):
            groups[key].discard(node.node_id)
            if not groups[key]:
                del groups[key]
        self._retop()

    def pool(self, q: _Query, rule: int) -> tuple[int, Suffix | Union]:
        """The smallest known superset of this bucket's feasible nodes, and its size.

        Called only on a bucket that ``could_fit`` the task, so each needed suffix is non-empty.
        """
        best: Suffix | Union = Suffix(self.by_dim[0], 0)
        size = len(self.nodes)
        for d, amount in q.needed:
            entries = self.by_dim[d]
            start = bisect_left(entries, (amount,))
            if len(entries) - start < size:
                size, best = len(entries) - start, Suffix(entries, start)
        if q.gpu_keys is not None:
            bags = [bag for key in q.gpu_keys if (bag := self.by_gpu.get(key)) is not None]
            n = sum(len(bag) for bag in bags)
            if n == 0:
                return 0, best
            if n < size:
                size, best = n, Union(bags)
        if rule == _HERE:
            here = self.by_location.get(q.location)
            if here is None:
                return 0, best
            if len(here) < size:
                size, best = len(here), Union([here])
        return size, best

    def pick(self, q: _Query, rule: int, rng: random.Random) -> NodeView | None:
        """A uniformly random feasible node of this bucket, or None."""
        size, pool = self.pool(q, rule)
        if size == 0:
            return None
        for _ in range(min(size, SAMPLES)):
            node = self.nodes[pool.at(rng.randrange(size))]
            if q.accepts(node, rule):
                return node
        feasible = [node for node_id in pool if q.accepts(node := self.nodes[node_id], rule)]
        return rng.choice(feasible) if feasible else None

    def collect(self, q: _Query, rule: int, limit: int) -> list[NodeView]:
        """Up to ``limit`` feasible nodes of this bucket, lowest load first."""
        size, pool = self.pool(q, rule)
        found: list[NodeView] = []
        if size:
            for node_id in pool:
                node = self.nodes[node_id]
                if q.accepts(node, rule):
                    found.append(node)
                    if len(found) >= limit:
                        break
        found.sort(key=lambda node: node.load)
        return found


class CandidateIndex:
    """NodeViews by id, indexed for fast matching (see the module docstring)."""

    def __init__(self, nodes: Iterable[NodeView] = ()) -> None:
        self._nodes: dict[str, NodeView] = {}
        self._buckets: dict[Tier, list[_Bucket]] = {tier: [_Bucket() for _ in range(LOAD_BINS)] for tier in Tier}
        self._placed: dict[str, _Bucket] = {}
        self._gpu_names: dict[str, int] = {}  # case-folded GPU name -> indexed nodes with it
        for node in nodes:
            self.upsert(node)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def views(self) -> Iterable[NodeView]:
        """Every stored view (candidates or not), e.g. to explain why nothing fits."""
        return self._nodes.values()

    def get(self, node_id: str) -> NodeView | None:
        """The stored view of ``node_id``, or None."""
        return self._nodes.get(node_id)

    def upsert(self, node: NodeView) -> None:
        """Add ``node`` or replace the view stored under its id."""
        self.remove(node.node_id)
        self._nodes[node.node_id] = node
        if not node.online or (node.max_tasks is not None and node.running_tasks >= node.max_tasks):
            return  # kept for get(), but never a candidate
        bucket = self._buckets[node.tier][load_bin(node.load)]
        bucket.add(node)
        self._placed[node.node_id] = bucket
        gpu = node.gpu_name.casefold()
        self._gpu_names[gpu] = self._gpu_names.get(gpu, 0) + 1

    def remove(self, node_id: str) -> bool:
        """Forget ``node_id``; True if it was there. Removing an unknown id is not an error."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        bucket = self._placed.pop(node_id, None)
        if bucket is not None:
            bucket.remove(node)
            gpu = node.gpu_name.casefold()
            self._gpu_names[gpu] -= 1
            if not self._gpu_names[gpu]:
                del self._gpu_names[gpu]
        return True

    def _passes(self, q: _Query) -> Iterator[tuple[int, _Bucket]]:
        """(location rule, bucket) in rank order, skipping tiers the submitter may not use."""
        for tier in Tier:
            if not eligible(tier, q.needs.submitter_credit, q.t):
                continue
            for rule in q.rules():
                for bucket in self._buckets[tier]:
                    if bucket.could_fit(q.amounts):
                        yield rule, bucket

    def choose(self, needs: TaskNeeds, t: TrustThresholds, *, rng: random.Random) -> NodeView | None:
        """A best feasible node (best tier, location match, lowest load bin; fair ties), or None."""
        q = _Query(needs, t, self._gpu_names)
        for rule, bucket in self._passes(q):
            node = bucket.pick(q, rule, rng)
            if node is not None:
                return node
        return None

    def candidates(self, needs: TaskNeeds, t: TrustThresholds, limit: int) -> list[NodeView]:
        """Up to ``limit`` distinct feasible nodes in rank order.

        Ordered like ``choose``: tier, location match, load bin; within one bin by exact load among
        the nodes taken from it (when a bin has more feasible nodes than are wanted, which of them
        are taken is not specified).
        """
        q = _Query(needs, t, self._gpu_names)
        found: list[NodeView] = []
        for rule, bucket in self._passes(q):
            if len(found) >= limit:
                break
            found.extend(bucket.collect(q, rule, limit - len(found)))
        return found

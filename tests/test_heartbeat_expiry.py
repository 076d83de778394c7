"""Many nodes silent at once: the expiry sweep and the heartbeat batcher deal with them in bulk.

A pool that was busy (or a network split) can leave hundreds of nodes late at once. The sweep
takes them offline a chunk per transaction and reads each chunk's heartbeats again just before,
and the batcher brings all the expired nodes of one flush back in one go, so the heartbeats of
every other node are not held up behind them.
"""

from __future__ import annotations

import functools
import time

import pytest

from models import allocation, nodes
from orchestration import nodes as node_cases
from orchestration.heartbeats import HeartbeatBatcher, HeartbeatStore
from tests.harness import PoolHarness, bearer
from tests.test_nodes_api import node_request

TIMEOUT = 30.0


def registered(pool: PoolHarness, count: int) -> list[str]:
    names = []
    for _ in range(count):
        name, token = pool.new_user()
        assert pool.nodes.RegisterWorkerNode(node_request(name), metadata=bearer(token)).success
        names.append(name)
    assert node_cases.expire_silent_nodes(pool.ctx.db, pool.ctx.heartbeats, timeout=TIMEOUT) == []  # seeds the epoch
    return names


def statuses(pool: PoolHarness, names: list[str]) -> dict[str, str]:
    with pool.ctx.db.reading() as session:
        return {name: record.status for name, record in nodes.get_many(session, names).items()}


def test_mass_expiry_goes_a_chunk_at_a_time_and_frees_what_the_nodes_held(
    pool: PoolHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_cases, "EXPIRY_CHUNK", 4)
    db, store = pool.ctx.db, pool.ctx.heartbeats
    names = registered(pool, 11)
    silent, fresh = names[:9], names[9:]
    need = allocation.Need(cpu_score=100, memory_gb=2)
    with db.reading() as session:
        pks = {name: record.pk for name, record in nodes.get_many(session, names).items()}
    for name in (silent[0], silent[5], fresh[0]):
        assert db.transaction(
            functools.partial(allocation.allocate, node_pk=pks[name], task_id=f"{name}-t", attempt=1, need=need)
        )
    long_ago = time.time() - 10 * TIMEOUT
    for name in silent:
        store.beat(name, "Idle", now=long_ago)

    released = node_cases.expire_silent_nodes(db, store, timeout=TIMEOUT)

    assert sorted(r.task_id for r in released) == sorted([f"{silent[0]}-t", f"{silent[5]}-t"])
    assert statuses(pool, names) == {**dict.fromkeys(silent, "offline"), **dict.fromkeys(fresh, "online")}
    assert set(store.silent_since(time.time())) == set(fresh)  # the expired left the heartbeat set
    with db.reading() as session:
        assert allocation.invariant_violations(session) == []
        assert allocation.active_allocation(session, f"{fresh[0]}-t", 1) is not None
    assert node_cases.expire_silent_nodes(db, store, timeout=TIMEOUT) == []  # a second sweep finds nothing


class LateBeat(HeartbeatStore):
    """The pool's Redis store, with one node's heartbeat arriving while the sweep is under way."""

    late_node = ""

    def last_seen(self, node_ids):  # type: ignore[no-untyped-def]
        ids = list(node_ids)
        if self.late_node in ids:
            self.beat(self.late_node, "Idle")
        return super().last_seen(ids)


def test_a_node_heard_from_while_the_sweep_runs_stays_online(
    pool: PoolHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_cases, "EXPIRY_CHUNK", 2)
    names = registered(pool, 5)
    store = LateBeat(pool.ctx.redis, pool.ctx.settings.REDIS_KEY_PREFIX)
    store.late_node = names[3]  # in the second chunk
    long_ago = time.time() - 10 * TIMEOUT
    for name in names:
        store.beat(name, "Idle", now=long_ago)

    node_cases.expire_silent_nodes(pool.ctx.db, store, timeout=TIMEOUT)

    assert statuses(pool, names) == {**dict.fromkeys(names, "offline"), names[3]: "online"}


def test_one_flush_brings_every_expired_node_back_at_once(pool: PoolHarness) -> None:
    db, store = pool.ctx.db, pool.ctx.heartbeats
    names = registered(pool, 8)
    calls: list[int] = []

    def revive(beats: dict[str, str]) -> set[str]:
        calls.append(len(beats))
        return node_cases.revive_many(db, store, beats)

    batcher = HeartbeatBatcher(store, revive, interval=3600)  # flushed by hand below
    try:
        for name in names:
            batcher.known_online(name)
        long_ago = time.time() - 10 * TIMEOUT
        for name in names[:6]:
            store.beat(name, "Idle", now=long_ago)
        node_cases.expire_silent_nodes(db, store, timeout=TIMEOUT)
        assert list(statuses(pool, names).values()).count("offline") == 6

        stranger = "no-such-node"
        batcher.known_online(stranger)  # e.g. deleted since
        for name in [*names, stranger]:
            assert batcher.offer(name, "Running 1 tasks")
        batcher.flush()

        assert calls == [7]  # the six expired nodes and the stranger, in one call
        assert statuses(pool, names) == dict.fromkeys(names, "online")
        assert store.messages(names) == dict.fromkeys(names, "Running 1 tasks")
        assert not store.silent_since(time.time() - TIMEOUT)
        assert not batcher.offer(stranger, "Idle")  # unknown: its next heartbeat takes the slow path
        assert batcher.offer(names[0], "Idle")
    finally:
        batcher.close()


def test_the_slow_path_still_refuses_an_unregistered_node(pool: PoolHarness) -> None:
    from models.errors import NotFound

    with pytest.raises(NotFound, match="not registered"):
        node_cases.revive(pool.ctx.db, pool.ctx.heartbeats, "never-registered")

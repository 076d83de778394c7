"""The beat reclamation sweep: allocations of vanished nodes come back; drift is repaired and logged."""

from __future__ import annotations

import sqlalchemy as sa

from models import allocation, nodes
from tests.harness import PoolHarness, bearer
from tests.test_nodes_api import node_request


def test_reclaim_releases_offline_nodes_and_repairs_drift(pool: PoolHarness, celery_worker_for) -> None:
    db = pool.ctx.db
    (a, token_a), (b, token_b) = pool.new_user(), pool.new_user()
    for owner, token in ((a, token_a), (b, token_b)):
        assert pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token)).success
    with db.reading() as session:
        node_a, node_b = nodes.get(session, a), nodes.get(session, b)
    assert node_a and node_b
    need = allocation.Need(cpu_score=100, memory_gb=2)
    assert db.transaction(lambda s: allocation.allocate(s, node_pk=node_a.pk, task_id=f"{a}-1", attempt=1, need=need))
    assert db.transaction(lambda s: allocation.allocate(s, node_pk=node_b.pk, task_id=f"{b}-1", attempt=1, need=need))

    # Node a vanishes without the heartbeat sweep noticing; node b's bookkeeping drifts.
    db.transaction(lambda s: nodes.set_status_many(s, [a], to="offline", expected="online"))
    db.transaction(
        lambda s: s.execute(
            sa.text("UPDATE nodes SET avail_memory_gb = 1, running_tasks = 5 WHERE node_id = :n"), {"n": b}
        )
    )
    with db.reading() as session:
        assert allocation.invariant_violations(session) != []

    worker = celery_worker_for(pool)
    outcome = pool.ctx.jobs.app.send_task("pool.maintenance.reclaim_resources").get(timeout=30)
    assert outcome["released"] >= 1 and outcome["repaired"] >= 1
    with db.reading() as session:
        assert allocation.invariant_violations(session) == []
        fixed_a, fixed_b = nodes.get(session, a), nodes.get(session, b)
        assert allocation.active_allocation(session, f"{a}-1", 1) is None
        assert allocation.active_allocation(session, f"{b}-1", 1) is not None
    assert fixed_a and fixed_a.available == fixed_a.capacity
    assert fixed_b and fixed_b.available["memory_gb"] == fixed_b.capacity["memory_gb"] - 2
    assert fixed_b.running_tasks == 1
    assert f"node {b}: available resources recomputed" in worker.log()
    # Twice is the same as once.
    again = pool.ctx.jobs.app.send_task("pool.maintenance.reclaim_resources").get(timeout=30)
    assert again == {"released": 0, "repaired": 0, "task_zips_dropped": 0}

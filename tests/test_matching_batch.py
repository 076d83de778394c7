"""Matching holds a batch's first choices in one statement; a node whose share it could not take
(the catalog's view of it was stale) sends its tasks on to their next candidates, one at a time."""

from __future__ import annotations

import random
from typing import Any

import sqlalchemy as sa

from models import allocation
from models.tables import Allocation, Node
from orchestration import scheduler
from orchestration.catalog import NodeCatalog
from tests.harness import bearer
from tests.tasks_support import upload
from tests.test_nodes_api import node_request

TASKS = 6


def test_tasks_whose_first_choice_went_stale_are_placed_on_the_next(make_pool, database_url: str, monkeypatch) -> None:
    pool = make_pool(database_url=database_url)
    owner, token = pool.new_user()
    for label in ("stale", "fresh"):
        reply = pool.nodes.RegisterWorkerNode(node_request(f"{owner}/{label}"), metadata=bearer(token))
        assert reply.success, reply.message
    db = pool.ctx.db
    catalog = NodeCatalog()
    with db.reading() as session:
        catalog.refresh(session)
    stale_pk = catalog.pks[f"{owner}/stale"]
    # Someone took all of the node's memory in a way the catalog's refresh does not see (its
    # change time is not newer): the catalog still offers it as the roomiest node.
    db.transaction(lambda s: s.execute(sa.update(Node).where(Node.id == stale_pk).values(avail_memory_gb=0)))
    _, submitter = pool.new_user()
    ids = {upload(pool, submitter) for _ in range(TASKS)}

    chose_stale = 0
    hold_many = allocation.hold_many

    def counting(session: sa.orm.Session, holds: dict[int, tuple[allocation.Need, int]]) -> list[Any]:
        nonlocal chose_stale
        chose_stale += stale_pk in holds
        return hold_many(session, holds)

    monkeypatch.setattr(allocation, "hold_many", counting)
    placed = scheduler.match_pending(db, catalog, pool.settings, rng=random.Random(3))
    assert chose_stale == 1, "the batch must have tried the stale node first"
    assert {task_id for task_id, _ in placed} == ids and all(attempt == 1 for _, attempt in placed)
    with db.reading() as session:
        on = set(session.scalars(sa.select(Allocation.node_pk).where(Allocation.task_id.in_(ids))))
        state = sa.select(Node.node_id, Node.avail_memory_gb, Node.running_tasks)
        nodes = {row.node_id: tuple(row)[1:] for row in session.execute(state.where(Node.node_id.like(f"{owner}/%")))}
    assert on == {catalog.pks[f"{owner}/fresh"]}
    assert nodes[f"{owner}/stale"] == (0, 0)  # nothing held on it, nothing given back
    assert nodes[f"{owner}/fresh"] == (16 - TASKS, TASKS)


def test_a_batch_is_handed_to_dispatch_once_committed_and_before_its_log_lines(make_pool, caplog) -> None:
    pool = make_pool()
    owner, token = pool.new_user()
    reply = pool.nodes.RegisterWorkerNode(node_request(f"{owner}/n"), metadata=bearer(token))
    assert reply.success, reply.message
    _, submitter = pool.new_user()
    ids = {upload(pool, submitter) for _ in range(3)}
    db, seen = pool.ctx.db, dict[str, Any]()

    def dispatch(attempts: list[tuple[str, int]]) -> None:
        with db.reading() as session:  # committed: another process's dispatch job would see them
            rows = session.execute(sa.select(Allocation.task_id, Allocation.attempt).where(Allocation.task_id.in_(ids)))
            seen["committed"] = set(map(tuple, rows))
        seen["attempts"] = set(attempts)
        seen["logged first"] = [r.getMessage() for r in caplog.records if "assigned to node" in r.getMessage()]

    with caplog.at_level("INFO", logger="orchestration.scheduler"):
        placed = scheduler.match_pending(db, NodeCatalog(), pool.settings, rng=random.Random(5), placed_then=dispatch)
    assert seen["attempts"] == set(placed) == seen["committed"] == {(task_id, 1) for task_id in ids}
    assert seen["logged first"] == []
    assert sum("assigned to node" in r.getMessage() for r in caplog.records) == 3

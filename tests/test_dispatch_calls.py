"""Dispatch's calls to the nodes: a job of one task makes its call blocking, a job of several has
them in flight together; either way each task's outcome reads the same, answered or not."""

from __future__ import annotations

import random

from orchestration import dispatcher, scheduler
from orchestration.catalog import NodeCatalog
from tests.adversary import trusted
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import upload


def placed_tasks(pool, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """``count`` tasks uploaded and placed (ASSIGNED, attempt 1) on the pool's one node."""
    _, submitter = pool.new_user()
    ids = [upload(pool, submitter) for _ in range(count)]
    placed = scheduler.match_pending(pool.ctx.db, NodeCatalog(), pool.settings, rng=random.Random(3))
    assert sorted(placed) == sorted((task_id, 1) for task_id in ids)
    return ids


def send(pool, task_ids: list[str]) -> dict[str, dispatcher.Outcome]:  # type: ignore[no-untyped-def]
    """One dispatch job's calls for ``task_ids``, from this process."""
    outcomes = dispatcher.execute_many(
        pool.ctx.db,
        pool.ctx.lifecycle.storage,
        pool.ctx.signer,
        dispatcher.Channels(1 << 20),
        pool.settings,
        [(task_id, 1) for task_id in task_ids],
    )
    return {task_id: outcome for (task_id, _), outcome in outcomes.items()}


def test_a_lone_call_and_calls_together_are_answered_alike(make_pool, database_url: str, workers: list) -> None:
    pool = make_pool(database_url=database_url)
    node = ScriptedWorker(pool, owner=trusted(pool))
    workers.append(node)
    alone, *together = placed_tasks(pool, 3)

    outcomes = {**send(pool, [alone]), **send(pool, together)}

    assert {task_id: (o.accepted, o.reason) for task_id, o in outcomes.items()} == {
        task_id: (True, "accepted") for task_id in [alone, *together]
    }
    assert all(o.task is not None and o.task.task_id == task_id for task_id, o in outcomes.items())
    assert sorted(node.incoming) == sorted((task_id, 1) for task_id in [alone, *together])


def test_a_lone_call_and_calls_together_to_a_silent_node_fail_alike(
    make_pool, database_url: str, workers: list, dead_port: int
) -> None:
    pool = make_pool(database_url=database_url)
    ghost = ScriptedWorker(pool, owner=trusted(pool))
    workers.append(ghost)
    ghost.register(port=dead_port, cpu_cores=4, memory_gb=16, cpu_score=1000, docker_status="enabled")
    alone, *together = placed_tasks(pool, 3)

    outcomes = {**send(pool, [alone]), **send(pool, together)}

    assert {task_id: (o.accepted, o.reason) for task_id, o in outcomes.items()} == {
        task_id: (False, "node unreachable (UNAVAILABLE)") for task_id in [alone, *together]
    }
    assert ghost.incoming == []  # nothing reached the ghost's own server

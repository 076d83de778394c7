"""A task whose zip is not in place yet when dispatch reads it.

On PostgreSQL an upload commits its task and then moves the zip into place (uploads.insert_alone);
a matching job may place the task in between, the more so when the gRPC servers run at a lower
priority than the jobs (`GRPC_NICE`). Dispatch waits for the zip, and a zip that never comes costs
the node nothing: the missing zip is the pool's doing, not the node's. (A zip small enough to be
kept in the database, INLINE_ZIP_BYTES, is written with its task: these pools keep every zip as a file.)
"""

from __future__ import annotations

import os
import random
import threading

from orchestration import scheduler
from orchestration.catalog import NodeCatalog
from tests.adversary import trusted
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import FAST, dispatch_now, upload, wait_status
from tests.test_economy import audit_ok, credit_of


def test_dispatch_waits_for_a_zip_its_upload_is_still_placing(make_pool, database_url: str, workers: list) -> None:
    pool = make_pool(database_url=database_url, INLINE_ZIP_BYTES=0)
    node = ScriptedWorker(pool, owner=trusted(pool))
    workers.append(node)
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    assert scheduler.match_pending(pool.ctx.db, NodeCatalog(), pool.settings, rng=random.Random(3)) == [(task_id, 1)]
    placed = pool.ctx.lifecycle.storage.task_zip(task_id)
    aside = placed.with_name("aside.zip")
    os.replace(placed, aside)  # as between the upload's commit and its move of the zip
    late = threading.Timer(0.3, os.replace, (aside, placed))
    late.start()
    try:
        outcome = dispatch_now(pool, task_id)
    finally:
        late.join()

    assert outcome.accepted, outcome.reason
    assert node.incoming == [(task_id, 1)]


def test_a_zip_that_never_comes_fails_the_task_and_costs_the_node_nothing(
    make_pool, database_url: str, celery_worker_for, workers: list
) -> None:
    # Two attempts, each waiting dispatcher.ZIP_WAIT_SECONDS for the zip, then the task fails.
    pool = make_pool(database_url=database_url, INLINE_ZIP_BYTES=0, **{**FAST, "MAX_TASK_ATTEMPTS": 2})
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)  # no node yet: it waits PENDING
    pool.ctx.lifecycle.storage.task_zip(task_id).unlink()
    node = ScriptedWorker(pool, owner=trusted(pool, credit=100))
    workers.append(node)
    celery_worker_for(pool)

    failed = wait_status(pool, submitter, task_id, "FAILED", timeout=60, kick=True)

    assert "task zip missing from storage" in failed.message
    assert node.incoming == []  # never dialled without its zip
    assert credit_of(pool, node.owner) == 100
    assert pool.balance(submitter) == 1000  # the escrow came back
    audit_ok(pool)

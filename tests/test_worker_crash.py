"""A Celery worker SIGKILLed in the middle of dispatch: the task still completes, exactly once."""

from __future__ import annotations

import time

from models import allocation, ledger, tasks
from tests.harness import PoolHarness
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, upload, wait_status


def test_sigkill_mid_dispatch_loses_nothing(make_pool, database_url: str, celery_worker_for) -> None:
    pool: PoolHarness = make_pool(database_url=database_url, **FAST)
    first = celery_worker_for(pool, wait_ready=False)
    node = ScriptedWorker(pool, script=Script(accept_delay=3.0, run_seconds=0.3))
    try:
        _, token = pool.new_user()
        task_id = upload(pool, token)
        deadline = time.monotonic() + 30
        while not node.incoming and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.incoming == [(task_id, 1)], "the dispatch job should be waiting on ExecuteTask"
        first.kill()  # SIGKILL: main process and pool children, mid-call

        celery_worker_for(pool)  # a fresh worker; beat's recovery sweep is run by wait_status(kick=True)
        done = wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
        assert done.output

        with pool.ctx.db.reading() as session:
            task = tasks.get(session, task_id)
            assert task is not None
            completions = [e for e in tasks.history(session, task.pk) if e.to_status == "COMPLETED"]
            assert [(e.attempt, e.from_status) for e in completions][:1] and len(completions) == 1
            assert task.attempt == 1
            assert all(allocation.active_allocation(session, task_id, n) is None for n in (1, 2, 3))
            assert allocation.invariant_violations(session) == []
            assert ledger.audit(session).ok
        assert {attempt for _, attempt in node.executed} == {1}
    finally:
        node.close()

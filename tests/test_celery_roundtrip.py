"""A real Celery worker process runs a job from the pool's queues and answers through Redis."""

from __future__ import annotations

from models import ledger
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer


def test_audit_job_runs_on_a_real_worker(pool: PoolHarness, celery_worker_for) -> None:
    (_, token), (bob, _) = pool.new_user(), pool.new_user()
    assert pool.users.Transfer(pb.TransferRequest(receiver_username=bob, amount=7), metadata=bearer(token)).success
    worker = celery_worker_for(pool)

    result = pool.ctx.jobs.app.send_task("pool.maintenance.audit_ledger")
    report = result.get(timeout=30)

    with pool.ctx.db.reading() as session:
        direct = ledger.audit(session)
    assert report["ok"] is True, report["problems"]
    assert report["minted"] == direct.minted >= 2 * pool.settings.INITIAL_BALANCE
    assert report["balances"] == direct.balances
    assert "pool.maintenance.audit_ledger" in worker.log()
    # It travelled on the maintenance queue, as the routes say.
    assert pool.ctx.jobs.app.amqp.router.route({}, "pool.maintenance.audit_ledger")["queue"].name == "maintenance"

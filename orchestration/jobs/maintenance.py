"""Maintenance jobs run by beat: sweeps and the ledger audit."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from models import ledger
from orchestration.runtime import database

log = logging.getLogger(__name__)


@shared_task(name="pool.maintenance.audit_ledger", bind=True)
def audit_ledger(self: Task) -> dict[str, Any]:
    """Check that Σ balances + Σ escrow + Σ pending = Σ minted; log loudly when it does not."""
    with database(self.app).reading() as session:
        report = ledger.audit(session)
    if report.ok:
        log.info(
            "ledger balances: minted=%d balances=%d escrow=%d pending=%d",
            report.minted,
            report.balances,
            report.escrow,
            report.pending,
        )
    else:
        log.error("LEDGER DOES NOT BALANCE: %s", "; ".join(report.problems))
    return {
        "ok": report.ok,
        "minted": report.minted,
        "balances": report.balances,
        "escrow": report.escrow,
        "pending": report.pending,
        "problems": list(report.problems),
    }


@shared_task(name="pool.maintenance.expire_heartbeats", bind=True)
def expire_heartbeats(self: Task) -> int:
    """Nodes silent past the heartbeat timeout go offline (filled in with node management)."""
    return 0


@shared_task(name="pool.maintenance.reclaim_resources", bind=True)
def reclaim_resources(self: Task) -> int:
    """Release allocations of terminal tasks and vanished nodes (filled in with allocation)."""
    return 0

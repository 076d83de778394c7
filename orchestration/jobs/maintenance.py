"""Maintenance jobs run by beat: heartbeat expiry, resource reclamation, the ledger audit.

Each is idempotent and safe to run twice or to overlap with itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from models import ledger
from orchestration import nodes
from orchestration.runtime import database, heartbeats, settings_of

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
    """Nodes silent past NODE_HEARTBEAT_TIMEOUT go offline; returns how many allocations were freed."""
    settings = settings_of(self.app)
    released = nodes.expire_silent_nodes(
        database(self.app), heartbeats(self.app), timeout=settings.NODE_HEARTBEAT_TIMEOUT
    )
    return len(released)


@shared_task(name="pool.maintenance.reclaim_resources", bind=True)
def reclaim_resources(self: Task) -> dict[str, int]:
    """Release allocations of vanished nodes and repair availability drift."""
    freed, repaired = nodes.reclaim(database(self.app))
    return {"released": len(freed), "repaired": len(repaired)}

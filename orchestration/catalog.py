"""The nodes as matching sees them: a CandidateIndex kept current from the nodes changed since its
last look, one per worker process. Advisory: the database's conditional allocation decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from models.tables import RESOURCE_DIMENSIONS, Node, table_of
from orchestration.policies.index import CandidateIndex
from orchestration.policies.matching import NodeView, Resources
from orchestration.policies.trust import Tier


def _resources(node: object, prefix: str) -> Resources:
    return Resources(*(getattr(node, f"{prefix}_{d}") for d in RESOURCE_DIMENSIONS))


_nodes = table_of(Node)
_CATALOG_COLUMNS = select(  # the columns a NodeView needs, as plain rows: no ORM objects per node
    *(
        _nodes.c[name]
        for name in (
            "id",
            "node_id",
            "tier",
            "status",
            "gpu_name",
            "location",
            "running_tasks",
            "max_tasks",
            "changed_at",
            *(f"{prefix}_{d}" for prefix in ("cap", "avail") for d in RESOURCE_DIMENSIONS),
        )
    )
)
_CHANGED_SINCE = _CATALOG_COLUMNS.where(_nodes.c.changed_at >= bindparam("since"))


@dataclass
class NodeCatalog:
    index: CandidateIndex = field(default_factory=CandidateIndex)
    pks: dict[str, int] = field(default_factory=dict)
    since: datetime | None = None
    applied: dict[str, datetime] = field(default_factory=dict)  # node id -> changed_at of the row in the index

    def refresh(self, session: Session) -> int:
        """Load nodes changed since the last refresh (all of them the first time); how many.

        The look-back overlaps the last one by two seconds (a transaction may commit after a later
        one); rows already applied at the same ``changed_at`` are skipped, not rebuilt."""
        if self.since is None:
            rows = session.execute(_CATALOG_COLUMNS)
        else:
            rows = session.execute(_CHANGED_SINCE, {"since": self.since - timedelta(seconds=2)})
        count = 0
        applied = self.applied
        for node in rows:
            if applied.get(node.node_id) == node.changed_at:
                continue
            applied[node.node_id] = node.changed_at
            self.pks[node.node_id] = node.id
            self.index.upsert(
                NodeView(
                    node_id=node.node_id,
                    tier=Tier[node.tier.upper()],
                    online=node.status == "online",
                    capacity=_resources(node, "cap"),
                    available=_resources(node, "avail"),
                    gpu_name=node.gpu_name,
                    location=node.location,
                    running_tasks=node.running_tasks,
                    max_tasks=node.max_tasks,
                )
            )
            self.since = max(self.since or node.changed_at, node.changed_at)
            count += 1
        return count

    def forget(self) -> None:
        """Reload every node at the next refresh (after a rolled-back batch)."""
        self.since = None
        self.applied.clear()

    def took(self, view: NodeView, need: Resources) -> None:
        """Reflect our own allocation at once, without waiting for the next refresh."""
        self.index.upsert(
            NodeView(
                node_id=view.node_id,
                tier=view.tier,
                online=view.online,
                capacity=view.capacity,
                available=view.available - need,
                gpu_name=view.gpu_name,
                location=view.location,
                running_tasks=view.running_tasks + 1,
                max_tasks=view.max_tasks,
            )
        )

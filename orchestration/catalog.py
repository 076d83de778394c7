"""The nodes as matching sees them: a CandidateIndex kept current from the nodes changed since its
last look, one per worker process. Advisory: the database's conditional allocation decides."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, bindparam, select, type_coerce
from sqlalchemy.orm import Session
from sqlalchemy.types import NullType

from models.allocation import NODE_COLUMNS
from models.tables import RESOURCE_DIMENSIONS, Node, table_of
from orchestration.policies.index import CandidateIndex
from orchestration.policies.matching import NodeView, Resources
from orchestration.policies.trust import Tier


def _resources(node: object, prefix: str) -> Resources:
    return Resources(*(getattr(node, f"{prefix}_{d}") for d in RESOURCE_DIMENSIONS))


_nodes = table_of(Node)
# changed_at as the driver hands it back (a string on SQLite, a datetime on PostgreSQL): compared
# with what was applied, not converted, for the rows a refresh finds unchanged.
_STAMP = type_coerce(_nodes.c.changed_at, NullType()).label("stamp")
_CATALOG_COLUMNS = select(*(_nodes.c[name] for name in NODE_COLUMNS), _STAMP)  # plain rows, no ORM objects
_CHANGED_STAMPS = select(_nodes.c.node_id, _STAMP).where(_nodes.c.changed_at >= bindparam("since"))
_BY_NODE_ID = _CATALOG_COLUMNS.where(_nodes.c.node_id.in_(bindparam("ids", expanding=True)))
READ_AT_ONCE = 500  # node ids a statement reads by: far below every backend's limit on parameters
OVERLAP = timedelta(seconds=2)  # a refresh looks back this far before the last change it saw


@dataclass
class NodeCatalog:
    index: CandidateIndex = field(default_factory=CandidateIndex)
    pks: dict[str, int] = field(default_factory=dict)
    since: datetime | None = None
    applied: dict[str, object] = field(default_factory=dict)  # node id -> stamp of the row in the index
    held: list[Row[Any]] = field(default_factory=list)  # rows our uncommitted holds left (see holding)

    def refresh(self, session: Session) -> int:
        """Load nodes changed since the last refresh (all of them the first time); how many.

        The look-back overlaps the last one by ``OVERLAP`` (a transaction may commit after a later
        one). It first reads only each such node's id and change stamp: the rows already applied
        with the same stamp, most of them under a steady stream of changes, are skipped without
        being read whole or rebuilt; the others are then read whole by id."""
        if self.since is None:
            return self._apply(session.execute(_CATALOG_COLUMNS))
        applied = self.applied
        stamps = session.execute(_CHANGED_STAMPS, {"since": self.since - OVERLAP})
        changed = [node_id for node_id, stamp in stamps if applied.get(node_id) != stamp]
        return sum(
            self._apply(session.execute(_BY_NODE_ID, {"ids": changed[start : start + READ_AT_ONCE]}))
            for start in range(0, len(changed), READ_AT_ONCE)
        )

    def _apply(self, rows: Iterable[Row[Any]]) -> int:
        """Put ``rows`` in the index: every node of the first look (the catalog is empty then), or
        those whose stamp :meth:`refresh` found changed."""
        count = 0
        for node in rows:
            self.applied[node.node_id] = node.stamp
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

    def holding(self, rows: Iterable[Row[Any]]) -> None:
        """Note the rows our holds left (:func:`allocation.hold_many`), to be applied once
        their transaction commits (:meth:`committed`): the next refresh then skips those nodes,
        which would otherwise be read back and rebuilt for a change that was our own."""
        self.held += rows

    def committed(self) -> None:
        """The holds noted since the last commit are in the database: apply them."""
        held, self.held = self.held, []
        if self.since is not None:  # else the next refresh reads every node anyway
            self._apply(held)

    def forget(self) -> None:
        """Reload every node at the next refresh (after a rolled-back batch)."""
        self.since = None
        self.applied.clear()
        self.held.clear()

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

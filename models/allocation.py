"""Atomic allocation and idempotent release of node resources.

``allocate`` is one conditional UPDATE (``avail = avail - need WHERE avail >= need …``) plus the
allocation row, in the caller's transaction; ``release`` flips ``released_at`` from NULL exactly
once and only then gives the resources back. No read-modify-write anywhere, so any number of
concurrent schedulers keep ``avail + Σ active allocations = capacity`` at every commit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, TextualSelect, and_, bindparam, column, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.types import NullType

from models.tables import RESOURCE_DIMENSIONS, Allocation, Node, table_of, utcnow


@dataclass(frozen=True)
class Need:
    cpu_score: int = 0
    memory_gb: int = 0
    gpu_score: int = 0
    gpu_memory_gb: int = 0

    def as_dict(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in RESOURCE_DIMENSIONS}

    def plus(self, other: Need) -> Need:
        return Need(**{d: getattr(self, d) + getattr(other, d) for d in RESOURCE_DIMENSIONS})


@dataclass(frozen=True)
class Released:
    allocation_id: int
    node_pk: int
    task_id: str
    attempt: int


def allocate(session: Session, *, node_pk: int, task_id: str, attempt: int, need: Need) -> int | None:
    """Hold ``need`` on node ``node_pk`` for ``task_id``/``attempt``; the allocation id, or None.

    None when the node is offline, lacks room in any dimension, is at its task cap, or when this
    attempt already holds an allocation (so a retried job cannot allocate twice).
    """
    if not hold(session, node_pk, need):
        return None
    amounts = need.as_dict()
    allocation = Allocation(node_pk=node_pk, task_id=task_id, attempt=attempt, **amounts)
    try:
        with session.begin_nested():
            session.add(allocation)
            session.flush()
    except IntegrityError:
        # This attempt is already allocated: undo our decrement, keep the first allocation.
        _give_back(session, node_pk, amounts)
        return None
    return allocation.id


_nodes = table_of(Node)  # Core statements: NodeCatalog.refresh reads nodes afresh, nothing in a session to keep in step


def hold(session: Session, node_pk: int, need: Need) -> bool:
    """The node's half of :func:`allocate`: take ``need`` from an online node with room and below
    its task cap, in one conditional UPDATE (:func:`hold_many` for one task). The caller records
    the allocation row in the same transaction (``allocate`` does; matching inserts a batch of
    them at once)."""
    return bool(_hold_shares(session, {node_pk: (need, 1)}))


def hold_many(session: Session, holds: dict[int, tuple[Need, int]]) -> list[Row[Any]]:
    """:func:`hold` for many nodes in one statement: node pk -> (the needs of its tasks summed,
    how many tasks). Each node takes all of its share or none of it, under the same conditions
    (online, room in every dimension, below its task cap counting them all). The rows of the
    nodes that took it, as the hold left them (:data:`NODE_COLUMNS`, and ``stamp``: ``changed_at``
    as the driver hands it back)."""
    return _hold_shares(session, holds)


def _hold_shares(session: Session, holds: dict[int, tuple[Need, int]]) -> list[Row[Any]]:
    rows = [(pk, count, *need.as_dict().values()) for pk, (need, count) in sorted(holds.items())]
    if not rows:
        return []
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":  # six arrays, whatever the number of shares
        columns = {name: list(values) for name, values in zip(_SHARE_COLUMNS, zip(*rows, strict=True), strict=True)}
        return list(session.execute(_HOLD_MANY_PG, {"now": now, **columns}).all())
    held: list[Row[Any]] = []
    for start in range(0, len(rows), _MAX_SHARES):
        chunk = rows[start : start + _MAX_SHARES]
        size = 1 << (len(chunk) - 1).bit_length()  # padded, so a few statements serve every batch
        params: dict[str, object] = {"now": now}
        for i, row in enumerate(chunk + [_NO_SHARE] * (size - len(chunk))):
            params.update(zip((f"{name}_{i}" for name in _SHARE_COLUMNS), row, strict=True))
        held += session.execute(_hold_many_statement(size), params).all()
    return held


_SHARE_COLUMNS = ("node", "tasks", *(f"need_{d}" for d in RESOURCE_DIMENSIONS))
# A node's columns as matching keeps them (orchestration.catalog reads the same), which a hold
# answers for the nodes it held.
NODE_COLUMNS = (
    "id", "node_id", "tier", "status", "gpu_name", "location", "running_tasks", "max_tasks", "changed_at",
    *(f"{prefix}_{d}" for prefix in ("cap", "avail") for d in RESOURCE_DIMENSIONS),
)  # fmt: skip
_NO_SHARE = (0, 0, *(0 for _ in RESOURCE_DIMENSIONS))  # node pk 0 matches no node
_MAX_SHARES = 512  # rows of one statement (six parameters each)


def _hold_statement(shares: str) -> TextualSelect:
    """The UPDATE of :func:`hold_many` over the rows of ``shares`` (SQL giving the share
    columns), answering the held nodes' rows."""
    nodes, dims = _nodes.name, RESOURCE_DIMENSIONS
    sql = (
        f"WITH share ({', '.join(_SHARE_COLUMNS)}) AS ({shares}) "
        f"UPDATE {nodes} SET "
        + ", ".join(f"avail_{d} = {nodes}.avail_{d} - share.need_{d}" for d in dims)
        + f", running_tasks = {nodes}.running_tasks + share.tasks, changed_at = :now"
        f" FROM share WHERE {nodes}.id = share.node AND {nodes}.status = 'online' AND "
        + " AND ".join(f"{nodes}.avail_{d} >= share.need_{d}" for d in dims)
        + f" AND ({nodes}.max_tasks IS NULL OR {nodes}.running_tasks + share.tasks <= {nodes}.max_tasks)"
        f" RETURNING {', '.join(f'{nodes}.{name}' for name in NODE_COLUMNS)}, {nodes}.changed_at AS stamp"
    )
    returned = (*(_nodes.c[name] for name in NODE_COLUMNS), column("stamp", NullType()))
    return text(sql).bindparams(bindparam("now", type_=_nodes.c.changed_at.type)).columns(*returned)


@functools.cache
def _hold_many_statement(size: int) -> TextualSelect:
    """The UPDATE of :func:`hold_many` for ``size`` shares, all of them bound parameters, as text
    (SQLite): SQLAlchemy does not cache the compiled form of a statement with a VALUES list (it
    compiled all 1,200 parameters of a batch of 200 afresh every time); a text statement it
    caches, so each size is compiled once."""
    rows = ", ".join(
        "(" + ", ".join(f"CAST(:{name}_{i} AS INTEGER)" for name in _SHARE_COLUMNS) + ")" for i in range(size)
    )
    return _hold_statement(f"VALUES {rows}")


# PostgreSQL: the shares as one array a column. A VALUES list of a batch of 200 (1,536 parameters,
# padded) cost the matcher more than the statement itself: SQLAlchemy's processing of every
# parameter, and psycopg's parsing of the statement at every execution (it keeps only short ones).
_HOLD_MANY_PG = _hold_statement(
    "SELECT * FROM unnest(" + ", ".join(f"CAST(:{name} AS INTEGER[])" for name in _SHARE_COLUMNS) + ")"
)


def _give_back(session: Session, node_pk: int, amounts: dict[str, int]) -> None:
    changes = {f"avail_{d}": getattr(Node, f"avail_{d}") + amount for d, amount in amounts.items()}
    session.execute(
        update(Node)
        .where(Node.id == node_pk)
        .values(**changes, running_tasks=Node.running_tasks - 1, changed_at=utcnow())
    )


def release(session: Session, allocation_id: int, reason: str) -> bool:
    """Give an allocation's resources back. True the first time, False ever after (idempotent)."""
    allocation = session.get(Allocation, allocation_id)
    if allocation is None:
        return False
    flipped = session.execute(
        update(Allocation)
        .where(Allocation.id == allocation_id, Allocation.released_at.is_(None))
        .values(released_at=utcnow(), release_reason=reason[:64])
    )
    if flipped.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _give_back(session, allocation.node_pk, {d: getattr(allocation, d) for d in RESOURCE_DIMENSIONS})
    return True


def active_allocation(session: Session, task_id: str, attempt: int) -> Allocation | None:
    return session.scalar(
        select(Allocation).where(
            Allocation.task_id == task_id, Allocation.attempt == attempt, Allocation.released_at.is_(None)
        )
    )


def release_task(session: Session, task_id: str, reason: str) -> list[Released]:
    """Release every active allocation of ``task_id`` (any attempt)."""
    rows = session.scalars(
        select(Allocation).where(Allocation.task_id == task_id, Allocation.released_at.is_(None))
    ).all()
    return [Released(a.id, a.node_pk, a.task_id, a.attempt) for a in rows if release(session, a.id, reason)]


def release_node(session: Session, node_pk: int, reason: str) -> list[Released]:
    """Release every active allocation on a node (it went offline or restarted)."""
    return release_nodes(session, [node_pk], reason)


def release_nodes(session: Session, node_pks: Iterable[int], reason: str) -> list[Released]:
    """Release every active allocation on these nodes."""
    pks = sorted(set(node_pks))
    if not pks:
        return []
    rows = session.scalars(
        select(Allocation).where(Allocation.node_pk.in_(pks), Allocation.released_at.is_(None)).order_by(Allocation.id)
    ).all()
    return [Released(a.id, a.node_pk, a.task_id, a.attempt) for a in rows if release(session, a.id, reason)]


def _held_by_node():  # type: ignore[no-untyped-def]
    return (
        select(
            Allocation.node_pk,
            func.count().label("tasks"),
            *[func.sum(getattr(Allocation, d)).label(d) for d in RESOURCE_DIMENSIONS],
        )
        .where(Allocation.released_at.is_(None))
        .group_by(Allocation.node_pk)
        .subquery()
    )


def invariant_violations(session: Session, limit: int = 20) -> list[str]:
    """Nodes where ``avail + Σ active = capacity`` or ``0 ≤ avail ≤ capacity`` fails (one snapshot)."""
    held = _held_by_node()
    broken = [
        or_(
            getattr(Node, f"avail_{d}") + func.coalesce(getattr(held.c, d), 0) != getattr(Node, f"cap_{d}"),
            getattr(Node, f"avail_{d}") < 0,
            getattr(Node, f"avail_{d}") > getattr(Node, f"cap_{d}"),
        )
        for d in RESOURCE_DIMENSIONS
    ]
    rows = session.execute(
        select(Node.node_id).outerjoin(held, held.c.node_pk == Node.id).where(or_(*broken)).limit(limit)
    ).all()
    return [f"node {node_id}: available + allocated ≠ capacity" for (node_id,) in rows]


def repair_drift(session: Session) -> list[str]:
    """Reset ``avail`` and ``running_tasks`` from the active allocations where they drifted.

    Returns one line per repaired node (for the log). Runs inside the caller's write transaction.
    """
    held = _held_by_node()
    drifted = [
        getattr(Node, f"avail_{d}") + func.coalesce(getattr(held.c, d), 0) != getattr(Node, f"cap_{d}")
        for d in RESOURCE_DIMENSIONS
    ]
    rows = session.execute(
        select(
            Node.id,
            Node.node_id,
            *[func.coalesce(getattr(held.c, d), 0) for d in RESOURCE_DIMENSIONS],
            func.coalesce(held.c.tasks, 0),
        )
        .outerjoin(held, held.c.node_pk == Node.id)
        .where(or_(*drifted, Node.running_tasks != func.coalesce(held.c.tasks, 0)))
    ).all()
    repaired = []
    for node_pk, node_id, *sums, tasks in rows:
        values = {
            f"avail_{d}": getattr(Node, f"cap_{d}") - int(s) for d, s in zip(RESOURCE_DIMENSIONS, sums, strict=True)
        }
        session.execute(
            update(Node)
            .where(
                Node.id == node_pk,
                and_(*[getattr(Node, f"cap_{d}") >= int(s) for d, s in zip(RESOURCE_DIMENSIONS, sums, strict=True)]),
            )
            .values(**values, running_tasks=int(tasks), changed_at=utcnow())
        )
        repaired.append(f"node {node_id}: available resources recomputed from {tasks} active allocation(s)")
    return repaired


def release_finished(session: Session) -> list[Released]:
    """Release active allocations whose task has ended or moved to another attempt."""
    from models.tables import Task

    rows = session.scalars(
        select(Allocation)
        .join(Task, Task.task_id == Allocation.task_id)
        .where(
            Allocation.released_at.is_(None),
            or_(Task.status.in_(["COMPLETED", "FAILED", "STOPPED"]), Task.attempt != Allocation.attempt),
        )
    ).all()
    return [Released(a.id, a.node_pk, a.task_id, a.attempt) for a in rows if release(session, a.id, "reclaimed")]

"""Worker nodes in the system of record: registration, status transitions, listing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import allocation
from models.tables import RESOURCE_DIMENSIONS, Node, User, utcnow


@dataclass(frozen=True)
class NodeSpec:
    """What a node says about itself when it registers (already validated)."""

    node_id: str
    hostname: str
    port: int
    cpu_cores: int
    cpu_score: int
    memory_gb: int
    gpu_score: int
    gpu_memory_gb: int
    gpu_name: str
    location: str
    docker_status: str  # enabled|disabled
    max_tasks: int | None = None


@dataclass(frozen=True)
class NodeRecord:
    pk: int
    node_id: str
    owner: str
    owner_credit: int
    hostname: str
    port: int
    cpu_cores: int
    gpu_name: str
    location: str
    docker_status: str
    tier: str
    status: str
    max_tasks: int | None
    running_tasks: int
    capacity: dict[str, int]
    available: dict[str, int]


def _record(node: Node, owner: User) -> NodeRecord:
    return NodeRecord(
        pk=node.id,
        node_id=node.node_id,
        owner=owner.username,
        owner_credit=owner.credit_score,
        hostname=node.hostname,
        port=node.port,
        cpu_cores=node.cpu_cores,
        gpu_name=node.gpu_name,
        location=node.location,
        docker_status=node.docker_status,
        tier=node.tier,
        status=node.status,
        max_tasks=node.max_tasks,
        running_tasks=node.running_tasks,
        capacity={d: getattr(node, f"cap_{d}") for d in RESOURCE_DIMENSIONS},
        available={d: getattr(node, f"avail_{d}") for d in RESOURCE_DIMENSIONS},
    )


@dataclass(frozen=True)
class Registration:
    record: NodeRecord
    created: bool
    released: list[allocation.Released]  # allocations of a previous life of the node


def register(session: Session, *, owner: User, spec: NodeSpec, tier: str) -> Registration:
    """Insert the node, or re-register it: capacity and address from ``spec``, status online.

    A node that registers again has restarted: whatever it held is released (its tasks move on
    to their next attempt) and its availability is its full new capacity.
    """
    node = session.scalar(select(Node).where(Node.node_id == spec.node_id).with_for_update())
    fields = {
        "hostname": spec.hostname,
        "port": spec.port,
        "cpu_cores": spec.cpu_cores,
        "gpu_name": spec.gpu_name,
        "location": spec.location,
        "docker_status": spec.docker_status,
        "tier": tier,
        "status": "online",
        "max_tasks": spec.max_tasks,
        "changed_at": utcnow(),
    }
    capacity = {d: getattr(spec, d) for d in RESOURCE_DIMENSIONS}
    if node is None:
        node = Node(
            node_id=spec.node_id,
            owner_id=owner.id,
            running_tasks=0,
            **fields,
            **{f"cap_{d}": v for d, v in capacity.items()},
            **{f"avail_{d}": v for d, v in capacity.items()},
        )
        session.add(node)
        session.flush()
        return Registration(_record(node, owner), created=True, released=[])
    released = allocation.release_node(session, node.id, "node re-registered")
    session.execute(
        update(Node)
        .where(Node.id == node.id)
        .values(
            **fields,
            **{f"cap_{d}": v for d, v in capacity.items()},
            **{f"avail_{d}": v for d, v in capacity.items()},
            running_tasks=0,
        )
    )
    session.refresh(node)
    return Registration(_record(node, owner), created=False, released=released)


def get(session: Session, node_id: str) -> NodeRecord | None:
    row = session.execute(
        select(Node, User).join(User, User.id == Node.owner_id).where(Node.node_id == node_id)
    ).first()
    return _record(row[0], row[1]) if row else None


def get_many(session: Session, node_ids: Iterable[str]) -> dict[str, NodeRecord]:
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    rows = session.execute(select(Node, User).join(User, User.id == Node.owner_id).where(Node.node_id.in_(ids))).all()
    return {node.node_id: _record(node, owner) for node, owner in rows}


def addresses(session: Session, node_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Where each of these registered nodes is served: node id -> (hostname, port). Three columns,
    not the node and its owner as entities: dispatch reads it for every batch it sends."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    rows = session.execute(select(Node.node_id, Node.hostname, Node.port).where(Node.node_id.in_(ids)))
    return {node_id: (hostname, port) for node_id, hostname, port in rows}


def statuses(session: Session, node_ids: Iterable[str]) -> dict[str, str]:
    """The status of each of these nodes that is registered."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    rows = session.execute(select(Node.node_id, Node.status).where(Node.node_id.in_(ids)))
    return {node_id: status for node_id, status in rows}


def set_status_many(session: Session, node_ids: Iterable[str], *, to: str, expected: str) -> dict[str, int]:
    """Guarded transition ``expected → to`` for many nodes in one statement; {node_id: pk} of
    the nodes this call moved (the others were not in ``expected``)."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    moved = session.execute(
        update(Node)
        .where(Node.node_id.in_(ids), Node.status == expected)
        .values(status=to, changed_at=utcnow())
        .returning(Node.node_id, Node.id)
    )
    return {node_id: pk for node_id, pk in moved}


def list_all(session: Session) -> list[NodeRecord]:
    rows = session.execute(select(Node, User).join(User, User.id == Node.owner_id).order_by(Node.node_id)).all()
    return [_record(node, owner) for node, owner in rows]


def online_node_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Node.node_id).where(Node.status == "online")))


def retier_owner(session: Session, owner_id: int, tier_of: Callable[[int, str], str]) -> int:
    """Recompute the tier of every node of ``owner_id`` (after a credit change); rows changed."""
    owner = session.get(User, owner_id)
    if owner is None:
        return 0
    changed = 0
    for node in session.scalars(select(Node).where(Node.owner_id == owner_id)):
        tier = tier_of(owner.credit_score, node.docker_status)
        if tier != node.tier:
            node.tier = tier
            node.changed_at = utcnow()
            changed += 1
    return changed

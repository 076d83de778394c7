"""Node use cases: register, heartbeat, list, expire the silent, reclaim leaked resources."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import allocation, nodes
from models.accounts import find_user
from models.db import Database
from models.errors import InvalidArgument, NotFound, PermissionDenied, Refused
from models.tables import Node
from orchestration.heartbeats import HeartbeatBatcher, HeartbeatStore
from orchestration.policies.addresses import check_target
from orchestration.policies.trust import TrustThresholds, node_tier, normalize_docker_status
from pool.settings import Settings

log = logging.getLogger("orchestration.nodes")

LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
BOUNDS = {  # inclusive ranges a real machine can have
    "cpu_cores": (1, 4096),
    "memory_gb": (0, 65536),
    "cpu_score": (0, 10_000_000),
    "gpu_score": (0, 10_000_000),
    "gpu_memory_gb": (0, 16384),
    "port": (1, 65535),
    "max_tasks": (0, 100_000),  # 0: no cap (as many tasks as the resources fit)
}


def thresholds(settings: Settings) -> TrustThresholds:
    return TrustThresholds(settings.TRUST_HIGH, settings.TRUST_NORMAL, settings.LOW_TIER_MIN_SUBMITTER_CREDIT)


def tier_label(credit: int, docker_status: str, t: TrustThresholds) -> str:
    return node_tier(credit, docker_status == "enabled", t).label


def canonical_node_id(raw: str, caller: str) -> str:
    """``<username>`` or ``<username>/<label>``, owned by ``caller``; returned with the caller's spelling.

    InvalidArgument for a malformed id, PermissionDenied for someone else's.
    """
    owner, slash, label = raw.partition("/")
    if not owner or (slash and not LABEL_RE.fullmatch(label)):
        raise InvalidArgument(
            "node_id must be your username, or <username>/<label> with a label of 1–32 letters, digits, '_', '.' or '-'"
        )
    if owner.lower() != caller.lower():
        raise PermissionDenied(f"node {raw!r} belongs to another user; a node_id starts with its owner's username")
    return caller + (f"/{label}" if slash else "")


def _text(value: str, field: str, limit: int) -> str:
    value = value.strip()
    if len(value) > limit or any(not ch.isprintable() for ch in value):
        raise InvalidArgument(f"{field} must be at most {limit} printable characters")
    return value


@dataclass(frozen=True)
class NodeRequest:
    """A RegisterWorkerNode request as plain values."""

    node_id: str
    hostname: str
    port: int
    cpu_cores: int
    memory_gb: int
    cpu_score: int
    gpu_score: int
    gpu_memory_gb: int
    location: str
    gpu_name: str
    docker_status: str
    max_tasks: int = 0  # 0: no cap


def validate(request: NodeRequest, caller: str, settings: Settings, resolve=None) -> nodes.NodeSpec:  # type: ignore[no-untyped-def]
    """The request as a NodeSpec, or InvalidArgument / PermissionDenied saying what is wrong."""
    node_id = canonical_node_id(request.node_id, caller)
    for field, (low, high) in BOUNDS.items():
        value = getattr(request, field)
        if not low <= value <= high:
            raise InvalidArgument(f"{field} must be between {low} and {high} (got {value})")
    try:
        docker = normalize_docker_status(request.docker_status)
    except ValueError as error:
        raise InvalidArgument(str(error)) from error
    problem = check_target(request.hostname, settings.NODE_ADDRESS_POLICY, resolve or resolve_host, own_addresses())
    if problem:
        raise InvalidArgument(problem)
    return nodes.NodeSpec(
        node_id=node_id,
        hostname=request.hostname,
        port=request.port,
        cpu_cores=request.cpu_cores,
        cpu_score=request.cpu_score,
        memory_gb=request.memory_gb,
        gpu_score=request.gpu_score,
        gpu_memory_gb=request.gpu_memory_gb,
        gpu_name=_text(request.gpu_name, "gpu_name", 128),
        location=_text(request.location, "location", 64),
        docker_status=docker,
        max_tasks=request.max_tasks or None,
    )


def resolve_host(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})


def own_addresses() -> frozenset[str]:
    try:
        return frozenset(resolve_host(socket.gethostname()))
    except OSError:
        return frozenset()


def register_node(
    db: Database, store: HeartbeatStore, settings: Settings, *, caller: str, spec: nodes.NodeSpec
) -> nodes.Registration:
    """Register (or re-register after a restart) a node of ``caller``'s; it is online at once."""
    t = thresholds(settings)

    def work(session: Session) -> nodes.Registration:
        owner = find_user(session, caller)
        if owner is None:
            raise NotFound("your account no longer exists")
        existing = session.scalar(select(Node.id).where(Node.node_id == spec.node_id))
        if existing is None:
            count = session.scalar(select(func.count()).select_from(Node).where(Node.owner_id == owner.id)) or 0
            if count >= settings.MAX_NODES_PER_OWNER:
                raise Refused(f"you already have {count} nodes, the most one owner may register")
        return nodes.register(
            session, owner=owner, spec=spec, tier=tier_label(owner.credit_score, spec.docker_status, t)
        )

    registration = db.transaction(work)
    store.mark(spec.node_id, "online")
    record = registration.record
    log.info(
        "Node %s (GPU: %s, Docker: %s) registered successfully",
        record.node_id,
        record.gpu_name or "none",
        record.docker_status,
        extra={
            "event": "node_registered",
            "node_id": record.node_id,
            "tier": record.tier,
            "restarted": not registration.created,
            "released": len(registration.released),
        },
    )
    return registration


def heartbeat(
    db: Database,
    store: HeartbeatStore,
    *,
    caller: str,
    node_id: str,
    message: str,
    batcher: HeartbeatBatcher | None = None,
    came_back: Callable[[int], object] | None = None,
) -> str:
    """Record a heartbeat from ``caller``'s node; brings an offline node back online (and then
    calls ``came_back(1)``).

    Nodes known to be online are batched (see HeartbeatBatcher); others take the slow path here,
    which answers NotFound for a node that was never registered.
    """
    node_id = canonical_node_id(node_id, caller)
    message = _text(message, "status_message", 200)
    if batcher is not None and batcher.offer(node_id, message):
        return "online"
    if store.beat(node_id, message) != "online":
        revive(db, store, node_id, message, came_back=came_back)
    if batcher is not None:
        batcher.known_online(node_id)
    return "online"


def revive(
    db: Database,
    store: HeartbeatStore,
    node_id: str,
    message: str = "",
    *,
    came_back: Callable[[int], object] | None = None,
) -> None:
    """The slow path of a heartbeat: make sure the node exists and is online in the DB and in Redis."""
    if node_id not in revive_many(db, store, {node_id: message}, came_back=came_back):
        raise NotFound(f"node {node_id} is not registered; call RegisterWorkerNode first")


def revive_many(
    db: Database,
    store: HeartbeatStore,
    beats: dict[str, str],
    *,
    came_back: Callable[[int], object] | None = None,
) -> set[str]:
    """:func:`revive` for many nodes at once (one read, one transaction, one Redis round trip),
    so that a flush of heartbeats finding hundreds of expired nodes does not stall on them.
    The nodes that are registered (and now online); the others are left alone. When some were
    offline, ``came_back(how many)`` is called once they are online again (their capacity with them)."""
    with db.reading() as session:
        known = nodes.statuses(session, beats)
    offline = [node_id for node_id, status in known.items() if status == "offline"]
    back = (
        db.transaction(lambda s: nodes.set_status_many(s, offline, to="online", expected="offline")) if offline else {}
    )
    for node_id in sorted(back):
        log.info("Node %s is back online", node_id, extra={"event": "node_online", "node_id": node_id})
    store.mark_many(known, "online")
    if back and came_back is not None:
        came_back(len(back))
    return set(known)


@dataclass(frozen=True)
class NodeListing:
    record: nodes.NodeRecord
    status: str  # offline | idle | busy
    last_heartbeat: float
    message: str


def list_nodes(db: Database, store: HeartbeatStore, *, timeout: float, now: float | None = None) -> list[NodeListing]:
    """Every registered node with a status derived from heartbeat freshness and allocations."""
    now = time.time() if now is None else now
    with db.reading() as session:
        records = nodes.list_all(session)
    seen = store.last_seen(r.node_id for r in records)
    messages = store.messages(r.node_id for r in records)
    listings = []
    for record in records:
        last = seen.get(record.node_id, 0.0)
        if record.status != "online" or now - last > timeout:
            status = "offline"
        else:
            status = "busy" if record.running_tasks else "idle"
        listings.append(NodeListing(record, status, last, messages.get(record.node_id, "")))
    return listings


EXPIRY_CHUNK = 200  # nodes taken offline per transaction
OFFLINE_FOR_SILENCE = "went offline: no heartbeat"  # in the log line of each node the sweep takes offline


def expire_silent_nodes(
    db: Database, store: HeartbeatStore, *, timeout: float, now: float | None = None
) -> list[allocation.Released]:
    """Nodes silent for longer than ``timeout`` go offline and give back what they held.

    Many nodes may fall silent at once (a network split, a pool that was busy): they are taken
    offline a chunk per transaction, and each chunk's heartbeats are read again just before, so
    a node whose heartbeat arrived while the sweep worked on earlier chunks stays online.
    """
    started = time.time()
    now = started if now is None else now
    with db.reading() as session:
        online = nodes.online_node_ids(session)
    if store.reseed_if_lost(online, now=now):
        log.warning("heartbeat state was missing from Redis; gave %d online nodes a fresh start", len(online))
        return []
    released: list[allocation.Released] = []
    silent = store.silent_since(now - timeout)
    for start in range(0, len(silent), EXPIRY_CHUNK):
        seen = store.last_seen(silent[start : start + EXPIRY_CHUNK])
        cutoff = now + (time.time() - started) - timeout  # the sweep's clock, moved on by its own work
        chunk = [node_id for node_id, at in seen.items() if at < cutoff]

        def work(session: Session, chunk: list[str] = chunk) -> tuple[dict[str, int], list[allocation.Released]]:
            moved = nodes.set_status_many(session, chunk, to="offline", expected="online")
            return moved, allocation.release_nodes(session, moved.values(), "node offline")

        moved, freed = db.transaction(work) if chunk else ({}, [])
        store.mark_many(chunk, "offline")
        released += freed
        per_node = Counter(item.node_pk for item in freed)
        for node_id, pk in sorted(moved.items()):
            log.warning(
                f"Node %s {OFFLINE_FOR_SILENCE} for %.0f s",
                node_id,
                timeout,
                extra={"event": "node_offline", "node_id": node_id, "released": per_node[pk]},
            )
    return released


def reclaim(db: Database) -> tuple[list[allocation.Released], list[str]]:
    """Release allocations held on offline nodes or by ended tasks, then repair availability drift."""

    def work(session: Session) -> tuple[list[allocation.Released], list[str]]:
        offline = session.scalars(select(Node.id).where(Node.status == "offline")).all()
        freed = allocation.release_nodes(session, offline, "reclaimed: node offline")
        freed += allocation.release_finished(session)
        return freed, allocation.repair_drift(session)

    freed, repaired = db.transaction(work)
    for line in repaired:
        log.error("resource drift repaired: %s", line, extra={"event": "drift_repaired"})
    if freed:
        log.warning("reclaimed %d allocation(s) from offline nodes", len(freed), extra={"event": "reclaimed"})
    return freed, repaired

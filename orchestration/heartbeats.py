"""Live node state in Redis: last heartbeat, last status message, and a status mirror.

The database is the record of which nodes are online; Redis holds what changes every few
seconds. A heartbeat is one Redis round trip. If Redis is lost (no ``epoch`` key), the next
sweep re-seeds every online node with a fresh heartbeat, so no node is expired merely because
the cache was emptied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

log = logging.getLogger(__name__)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class HeartbeatStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._seen = f"{prefix}:hb:seen"  # sorted set node_id -> unix time of last heartbeat
        self._message = f"{prefix}:hb:message"  # hash node_id -> last status message
        self._status = f"{prefix}:hb:status"  # hash node_id -> online|offline (mirror of the DB)
        self._epoch = f"{prefix}:hb:epoch"

    def beat(self, node_id: str, message: str, *, now: float | None = None) -> str | None:
        """Record a heartbeat; returns the mirrored status (None when Redis does not know the node)."""
        now = time.time() if now is None else now
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._seen, {node_id: now})
        pipe.hset(self._message, node_id, message[:200])
        pipe.hget(self._status, node_id)
        status = pipe.execute()[2]
        return _str(status) if status else None

    def beat_many(self, batch: dict[str, tuple[float, str]]) -> dict[str, str | None]:
        """Record many heartbeats in one round trip; the mirrored status of each node."""
        ids = list(batch)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._seen, {node: seen for node, (seen, _) in batch.items()})
        pipe.hset(self._message, mapping={node: message[:200] for node, (_, message) in batch.items()})
        pipe.hmget(self._status, ids)
        statuses = pipe.execute()[2]
        return {node: _str(raw) if raw else None for node, raw in zip(ids, statuses, strict=True)}

    def mark(self, node_id: str, status: str, *, now: float | None = None) -> None:
        """Mirror a DB status; an online node also gets a fresh heartbeat."""
        self.mark_many([node_id], status, now=now)

    def mark_many(self, node_ids: Iterable[str], status: str, *, now: float | None = None) -> None:
        """:meth:`mark` for many nodes in one round trip."""
        ids = list(node_ids)
        if not ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._status, mapping=dict.fromkeys(ids, status))
        if status == "online":
            pipe.zadd(self._seen, dict.fromkeys(ids, time.time() if now is None else now))
        else:
            pipe.zrem(self._seen, *ids)
        pipe.execute()

    def silent_since(self, cutoff: float) -> list[str]:
        """Nodes whose last heartbeat is older than ``cutoff``."""
        return [_str(raw) for raw in self._redis.zrangebyscore(self._seen, "-inf", f"({cutoff}")]

    def last_seen(self, node_ids: Iterable[str]) -> dict[str, float]:
        ids = list(node_ids)
        if not ids:
            return {}
        scores = self._redis.zmscore(self._seen, ids)
        return {node: float(score) for node, score in zip(ids, scores, strict=True) if score is not None}

    def messages(self, node_ids: Iterable[str]) -> dict[str, str]:
        ids = list(node_ids)
        if not ids:
            return {}
        values = self._redis.hmget(self._message, ids)
        return {node: _str(value) for node, value in zip(ids, values, strict=True) if value is not None}

    def reseed_if_lost(self, online: Iterable[str], *, now: float | None = None) -> bool:
        """After a Redis loss, give every DB-online node a fresh heartbeat. True when it re-seeded."""
        if self._redis.exists(self._epoch):
            return False
        now = time.time() if now is None else now
        ids = list(online)
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(ids), 5000):
            chunk = ids[start : start + 5000]
            pipe.zadd(self._seen, dict.fromkeys(chunk, now))
            pipe.hset(self._status, mapping=dict.fromkeys(chunk, "online"))
        pipe.set(self._epoch, str(now))
        pipe.execute()
        return True


class HeartbeatBatcher:
    """Heartbeats of nodes known to be online, written to Redis in one pipeline per interval.

    A heartbeat then costs the gRPC handler a set look-up and a dict insert. Each flush also reads
    the status mirror of the nodes it wrote: a node found offline (expired by the sweep meanwhile)
    or unknown (Redis lost) is handed to ``revive`` with the others of its flush, which runs the
    slow path for all of them at once, and is no longer batched until that succeeds. Unknown
    nodes are never batched: their first heartbeat takes the slow path, so an unregistered node
    gets its answer at once.
    """

    def __init__(
        self, store: HeartbeatStore, revive: Callable[[dict[str, str]], set[str]], *, interval: float = 0.25
    ) -> None:
        self._store = store
        self._revive = revive  # {node_id: message} -> the nodes now online
        self._interval = interval
        self._online: set[str] = set()
        self._pending: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)
        self._thread.start()

    def offer(self, node_id: str, message: str) -> bool:
        """Queue a heartbeat of a node known to be online; False when the caller must take the slow path."""
        if node_id not in self._online:
            return False
        with self._lock:
            self._pending[node_id] = (time.time(), message)
        return True

    def known_online(self, node_id: str) -> None:
        self._online.add(node_id)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            statuses = self._store.beat_many(batch)
        except redis.RedisError as error:
            log.warning("could not write %d heartbeats: %s", len(batch), error)
            with self._lock:  # keep them for the next flush, newer ones win
                self._pending = {**batch, **self._pending}
            return
        fallen = {node_id: batch[node_id][1] for node_id, status in statuses.items() if status != "online"}
        if not fallen:
            return
        self._online.difference_update(fallen)
        try:  # all at once: one by one, a mass expiry would hold up every other node's heartbeat
            self._online.update(self._revive(fallen))
        except Exception:  # their next heartbeats take the slow path
            log.warning("heartbeats of %d node(s) not applied", len(fallen), exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

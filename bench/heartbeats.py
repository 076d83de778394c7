"""ReportStatus calls per second from 10,000 registered nodes, against a bare grpcio echo server.

Both servers run in their own processes with the same server options; the same client drives
them in alternating rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import insert

from api.tokens import TokenCodec
from bench.common import SECRET, Comparison, Figure, free_port, pool_env, process, scratch, wait_serving
from bench.load import rate
from models import schema
from models.db import Database
from models.tables import Node, User
from protos import nodepool_pb2 as pb

METHOD = "/nodepool.NodeManagerService/ReportStatus"


def seed_nodes(db: Database, count: int) -> list[tuple[str, str]]:
    """``count`` users each owning one node (inserted in bulk); (node_id, token) pairs."""
    users = [{"username": f"hb{i:06d}", "password_hash": "x", "credit_score": 50} for i in range(count)]
    with db.engine.begin() as conn:
        conn.execute(insert(User), users)
        ids = dict(conn.execute(User.__table__.select().with_only_columns(User.username, User.id)).all())
        conn.execute(
            insert(Node),
            [
                {
                    "node_id": name,
                    "owner_id": ids[name],
                    "hostname": "127.0.0.1",
                    "port": 1,
                    "cpu_cores": 4,
                    "gpu_name": "",
                    "location": "",
                    "docker_status": "enabled",
                    "tier": "normal",
                    "status": "online",
                    "running_tasks": 0,
                    **{
                        f"{k}_{d}": v
                        for k in ("cap", "avail")
                        for d, v in (("cpu_score", 1000), ("memory_gb", 8), ("gpu_score", 0), ("gpu_memory_gb", 0))
                    },
                }
                for name in ids
            ],
        )
    codec = TokenCodec(SECRET, 24)
    return [(name, codec.issue(name, uid)) for name, uid in ids.items()]


def run(redis_url: str, *, nodes: int = 10_000, rounds: int = 5, seconds: float = 4.0) -> Comparison:
    with scratch("hm-bench-hb-") as work:
        return _run(work, redis_url, nodes, rounds, seconds)


def _run(work: Path, redis_url: str, nodes: int, rounds: int, seconds: float) -> Comparison:
    db_url = f"sqlite:///{work / 'pool.db'}"
    db = Database(db_url)
    schema.upgrade(db.engine)
    fleet = seed_nodes(db, nodes)
    db.dispose()
    requests = [
        (pb.ReportStatusRequest(node_id=node, status_message="Idle"), [("authorization", f"Bearer {token}")])
        for node, token in fleet
    ]

    def make(i: int) -> tuple[pb.ReportStatusRequest, list[tuple[str, str]]]:
        return requests[i % len(requests)]

    pool_port, echo_port = free_port(), free_port()
    env = pool_env(work, redis_url, DATABASE_URL=db_url, GRPC_SERVER_PORT=pool_port, REDIS_KEY_PREFIX="hmbench")
    with (
        process([sys.executable, "-m", "pool", "serve"], env, work / "pool.log") as pool,
        process([sys.executable, "-m", "bench.echo_server", str(echo_port)], env, work / "echo.log") as echo,
    ):
        wait_serving(pool_port, pool, work / "pool.log")
        wait_serving(echo_port, echo, work / "echo.log")
        # Warm-up: one heartbeat from every node, as after their registration (the first one of a
        # node the server has not seen takes the slow path through the database).
        rate(f"127.0.0.1:{pool_port}", METHOD, make, pb.StatusResponse, seconds=300, limit=nodes)
        rate(f"127.0.0.1:{echo_port}", METHOD, make, pb.StatusResponse, seconds=3)
        ours, raw = [], []
        for _ in range(rounds):
            value, errors = rate(f"127.0.0.1:{pool_port}", METHOD, make, pb.StatusResponse, seconds=seconds)
            assert errors == 0, f"{errors} heartbeats failed"
            ours.append(value)
            raw.append(rate(f"127.0.0.1:{echo_port}", METHOD, make, pb.StatusResponse, seconds=seconds)[0])
    return Comparison(
        f"Heartbeats, {nodes:,} nodes (ReportStatus)",
        Figure("pool", "calls/s", tuple(ours)),
        Figure("echo", "calls/s", tuple(raw)),
        "≥ 0.70×",
    )

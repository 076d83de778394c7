"""NodeManagerService: node registration, heartbeats, the node list and the pool's health."""

from __future__ import annotations

from api.context import PoolContext
from api.rpc import Call, rpc
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc


def pool_health(ctx: PoolContext) -> tuple[bool, str]:
    """Whether the database and Redis answer, with a line saying which does not."""
    parts: list[str] = []
    healthy = True
    try:
        ctx.db.ping()
        parts.append("database ok")
    except Exception as error:  # any failure means unhealthy; the message says why
        healthy = False
        parts.append(f"database unreachable ({type(error).__name__})")
    try:
        ctx.redis.ping()
        parts.append("redis ok")
    except Exception as error:
        healthy = False
        parts.append(f"redis unreachable ({type(error).__name__})")
    return healthy, ", ".join(parts)


class NodeManagerService(pb_grpc.NodeManagerServiceServicer):
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx

    @rpc(pb.HealthCheckResponse, auth=False)
    def HealthCheck(self, request: pb.HealthCheckRequest, call: Call) -> pb.HealthCheckResponse:
        healthy, message = pool_health(self.ctx)
        return pb.HealthCheckResponse(healthy=healthy, message=message)

"""NodeManagerService: node registration, heartbeats, the node list and the pool's health."""

from __future__ import annotations

from api.context import PoolContext
from api.rpc import Call, rpc
from orchestration import nodes as node_cases
from orchestration.signing import ALGORITHM, ISSUER
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

    @rpc(pb.StatusResponse)
    def RegisterWorkerNode(self, request: pb.RegisterWorkerNodeRequest, call: Call) -> pb.StatusResponse:
        fields = node_cases.NodeRequest(
            node_id=request.node_id,
            hostname=request.hostname,
            port=request.port,
            cpu_cores=request.cpu_cores,
            memory_gb=request.memory_gb,
            cpu_score=request.cpu_score,
            gpu_score=request.gpu_score,
            gpu_memory_gb=request.gpu_memory_gb,
            location=request.location,
            gpu_name=request.gpu_name,
            docker_status=request.docker_status,
            max_tasks=request.max_tasks,
        )
        spec = node_cases.validate(fields, call.user.username, self.ctx.settings)
        registration = node_cases.register_node(
            self.ctx.db, self.ctx.heartbeats, self.ctx.settings, caller=call.user.username, spec=spec
        )
        if registration.released:  # the node restarted: what it was running moves to the next attempt
            ended = [(r.task_id, r.attempt) for r in registration.released]
            # No credit penalty: a node also re-registers after the pool itself was unreachable.
            self.ctx.lifecycle.ended_early(ended, "node restarted (re-registered)", node_caused=False)
        self.ctx.lifecycle.capacity_appeared(f"node {spec.node_id} registered")
        record = registration.record
        verb = "registered" if registration.created else "re-registered"
        return pb.StatusResponse(success=True, message=f"node {record.node_id} {verb} ({record.tier} trust tier)")

    @rpc(pb.StatusResponse)
    def ReportStatus(self, request: pb.ReportStatusRequest, call: Call) -> pb.StatusResponse:
        node_cases.heartbeat(
            self.ctx.db,
            self.ctx.heartbeats,
            caller=call.user.username,
            node_id=request.node_id,
            message=request.status_message,
            batcher=self.ctx.batcher,
            came_back=self.ctx.lifecycle.nodes_came_back,
        )
        return pb.StatusResponse(success=True, message="ok")

    @rpc(pb.GetNodeListResponse)
    def GetNodeList(self, request: pb.GetNodeListRequest, call: Call) -> pb.GetNodeListResponse:
        caller = call.user
        listings = node_cases.list_nodes(
            self.ctx.db, self.ctx.heartbeats, timeout=self.ctx.settings.NODE_HEARTBEAT_TIMEOUT
        )
        infos = []
        for item in listings:
            record = item.record
            revealed = caller.is_operator or record.owner.lower() == caller.username.lower()
            infos.append(
                pb.WorkerNodeInfo(
                    node_id=record.node_id,
                    hostname=record.hostname if revealed else "",
                    port=record.port if revealed else 0,
                    cpu_cores=record.cpu_cores,
                    memory_gb=record.capacity["memory_gb"],
                    status=item.status,
                    last_heartbeat=item.last_heartbeat,
                    cpu_score=record.capacity["cpu_score"],
                    gpu_score=record.capacity["gpu_score"],
                    gpu_memory_gb=record.capacity["gpu_memory_gb"],
                    location=record.location,
                    gpu_name=record.gpu_name,
                )
            )
        online = sum(1 for item in listings if item.status != "offline")
        return pb.GetNodeListResponse(success=True, message=f"{online} of {len(infos)} nodes online", nodes=infos)

    @rpc(pb.PoolPublicKeyResponse)
    def GetPoolPublicKey(self, request: pb.PoolPublicKeyRequest, call: Call) -> pb.PoolPublicKeyResponse:
        return pb.PoolPublicKeyResponse(
            public_key_pem=self.ctx.signer.public_key_pem, algorithm=ALGORITHM, issuer=ISSUER
        )

"""The gRPC server: ``create_server`` builds and binds it; ``serve`` runs it until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api.context import PoolContext, build_context
from api.metrics import start_metrics
from api.nodes import NodeManagerService
from api.tasks import MasterNodeService, WorkerReports
from api.upload_wire import ZeroCopyUploads
from api.users import UserService
from models import schema
from models.errors import InvalidArgument
from pool import collector
from pool.settings import Settings
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from protos.malformed import MalformedRequests

log = logging.getLogger("api.server")

SIGNAL_POLL_SECONDS = 0.5  # the main thread's wait for SIGTERM, in slices (as agent.node's, which says why)
SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in pb.DESCRIPTOR.services_by_name)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", settings.GRPC_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", settings.GRPC_KEEPALIVE_TIMEOUT_MS),
        ("grpc.max_receive_message_length", settings.GRPC_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", settings.GRPC_MAX_MESSAGE_BYTES),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def create_server(ctx: PoolContext, address: str) -> tuple[grpc.Server, int]:
    """A server with every service, health and reflection, bound to ``address`` (port 0 = any).

    Raises RuntimeError when the address cannot be bound.
    """
    settings = ctx.settings
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.GRPC_MAX_WORKERS, thread_name_prefix="rpc"),
        options=server_options(settings),
        interceptors=[MalformedRequests(stream_error=InvalidArgument), ZeroCopyUploads()],
    )
    pb_grpc.add_UserServiceServicer_to_server(UserService(ctx), server)
    pb_grpc.add_NodeManagerServiceServicer_to_server(NodeManagerService(ctx), server)
    pb_grpc.add_MasterNodeServiceServicer_to_server(MasterNodeService(ctx), server)
    pb_grpc.add_WorkerNodeServiceServicer_to_server(WorkerReports(ctx), server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    if settings.GRPC_TLS_CERT and settings.GRPC_TLS_KEY:
        credentials = grpc.ssl_server_credentials(
            [(settings.GRPC_TLS_KEY.read_bytes(), settings.GRPC_TLS_CERT.read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind the gRPC server to {address}")
    return server, port


def serve(settings: Settings, *, replica: int = 0) -> None:
    """Migrate, start the server and block until SIGINT/SIGTERM; then drain for a few seconds.

    ``replica``: this process's number among the gRPC server processes sharing the port
    (``hivemind-pool up`` runs ``GRPC_PROCESSES``). Replica N serves its metrics on METRICS_PORT + N;
    only replica 0 listens to the workers' task events, so each job's duration is counted once.
    """
    ctx = build_context(settings)
    schema.upgrade(ctx.db.engine)
    if replica == 0 and (advice := schema.unattended(ctx.db.engine)):
        log.warning(advice)
    server, port = create_server(ctx, settings.grpc_address)
    collector.settle()  # before the first call: a full collection no longer walks all of the above
    server.start()
    named = f" (replica {replica})" if replica else ""
    log.info("gRPC server listening on %s:%d%s", settings.GRPC_SERVER_HOST, port, named)
    metrics = None
    if settings.METRICS_PORT:
        metrics_port = settings.METRICS_PORT + replica
        try:  # the pool serves without metrics rather than not at all
            metrics = start_metrics(ctx, host=settings.GRPC_SERVER_HOST, port=metrics_port, job_events=replica == 0)
            log.info("Prometheus metrics on http://%s:%d/metrics", settings.GRPC_SERVER_HOST, metrics.port)
        except OSError as error:
            log.error("cannot serve metrics on port %d (%s); set METRICS_PORT", metrics_port, error)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping.wait(SIGNAL_POLL_SECONDS):
        pass
    log.info("gRPC server stopping")
    server.stop(grace=5).wait()
    if metrics is not None:
        metrics.stop()
    ctx.close()

"""The server as a client sees it: reflection, standard health, the pool's own HealthCheck."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness

SERVICES = {
    "nodepool.UserService",
    "nodepool.NodeManagerService",
    "nodepool.MasterNodeService",
    "nodepool.WorkerNodeService",
}


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return {service.name for reply in replies for service in reply.list_services_response.service}


def test_reflection_lists_every_service(sqlite_pool: PoolHarness) -> None:
    names = list_services(sqlite_pool.channel)
    assert names >= SERVICES | {"grpc.health.v1.Health"}


def test_standard_health_is_serving(sqlite_pool: PoolHarness) -> None:
    stub = health_pb2_grpc.HealthStub(sqlite_pool.channel)
    for service in ("", *SERVICES):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_pool_health_check_reports_database_and_redis(sqlite_pool: PoolHarness) -> None:
    reply = sqlite_pool.nodes.HealthCheck(pb.HealthCheckRequest())
    assert reply.healthy
    assert "database ok" in reply.message and "redis ok" in reply.message


def test_pool_health_check_says_which_part_is_down(make_pool, sqlite_url: str, dead_port: int) -> None:
    pool = make_pool(database_url=sqlite_url)
    pool.ctx.redis = type(pool.ctx.redis).from_url(f"redis://127.0.0.1:{dead_port}/0", socket_connect_timeout=0.5)
    reply = pool.nodes.HealthCheck(pb.HealthCheckRequest())
    assert not reply.healthy
    assert "database ok" in reply.message and "redis unreachable" in reply.message

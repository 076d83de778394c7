"""NodeManagerService over a real channel: ownership, validation, heartbeats, expiry (SPEC §3–5)."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from models import allocation, nodes
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.test_users_api import code_of


def node_request(node_id: str, **overrides) -> pb.RegisterWorkerNodeRequest:
    fields: dict[str, Any] = dict(
        node_id=node_id,
        hostname="127.0.0.1",
        cpu_cores=8,
        memory_gb=16,
        cpu_score=1000,
        gpu_score=2000,
        gpu_memory_gb=8,
        location="Asia/Taipei",
        port=50052,
        gpu_name="RTX 4090",
        docker_status="enabled",
    )
    fields.update(overrides)
    return pb.RegisterWorkerNodeRequest(**fields)


def listed(pool: PoolHarness, token: str) -> dict[str, pb.WorkerNodeInfo]:
    reply = pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(token))
    assert reply.success
    return {info.node_id: info for info in reply.nodes}


def test_node_registers_heartbeats_and_is_listed(pool: PoolHarness) -> None:
    owner, token = pool.new_user()
    reply = pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token))
    assert reply.success, reply.message
    assert "normal trust tier" in reply.message  # credit 50 with Docker
    beat = pool.nodes.ReportStatus(pb.ReportStatusRequest(node_id=owner, status_message="Idle"), metadata=bearer(token))
    assert beat.success
    info = listed(pool, token)[owner]
    assert info.status == "idle" and info.hostname == "127.0.0.1" and info.port == 50052
    assert (info.cpu_score, info.memory_gb, info.gpu_memory_gb, info.gpu_name) == (1000, 16, 8, "RTX 4090")
    assert time.time() - info.last_heartbeat < 10


@pytest.mark.parametrize(
    ("docker", "tier"), [("enabled", "normal"), ("available", "normal"), ("disabled", "low"), ("unavailable", "low")]
)
def test_docker_status_decides_the_tier_with_credit(sqlite_pool: PoolHarness, docker: str, tier: str) -> None:
    owner, token = sqlite_pool.new_user()
    reply = sqlite_pool.nodes.RegisterWorkerNode(node_request(owner, docker_status=docker), metadata=bearer(token))
    assert f"({tier} trust tier)" in reply.message
    # Docker status changes on re-registration: the tier follows.
    flipped = "disabled" if tier == "normal" else "enabled"
    reply = sqlite_pool.nodes.RegisterWorkerNode(node_request(owner, docker_status=flipped), metadata=bearer(token))
    assert f"({'low' if tier == 'normal' else 'normal'} trust tier)" in reply.message


def test_owner_with_several_machines_uses_labels(sqlite_pool: PoolHarness) -> None:
    owner, token = sqlite_pool.new_user()
    for label in ("gpu-box", "laptop"):
        assert sqlite_pool.nodes.RegisterWorkerNode(node_request(f"{owner}/{label}"), metadata=bearer(token)).success
    assert {f"{owner}/gpu-box", f"{owner}/laptop"} <= set(listed(sqlite_pool, token))


def test_other_users_cannot_register_reregister_or_heartbeat_a_node(pool: PoolHarness) -> None:
    owner, token = pool.new_user()
    _, mallory = pool.new_user()
    assert pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token)).success
    denied = grpc.StatusCode.PERMISSION_DENIED
    hijack = node_request(owner, hostname="203.0.113.9")
    assert code_of(pool.nodes.RegisterWorkerNode, hijack, metadata=bearer(mallory)) == denied
    assert code_of(pool.nodes.RegisterWorkerNode, node_request(f"{owner}/x"), metadata=bearer(mallory)) == denied
    heartbeat = pb.ReportStatusRequest(node_id=owner, status_message="Idle")
    assert code_of(pool.nodes.ReportStatus, heartbeat, metadata=bearer(mallory)) == denied
    assert listed(pool, token)[owner].hostname == "127.0.0.1"  # not re-pointed


def test_node_calls_without_a_token_are_unauthenticated(sqlite_pool: PoolHarness) -> None:
    owner, token = sqlite_pool.new_user()
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert code_of(sqlite_pool.nodes.RegisterWorkerNode, node_request(owner)) == unauth
    assert code_of(sqlite_pool.nodes.ReportStatus, pb.ReportStatusRequest(node_id=owner)) == unauth
    assert code_of(sqlite_pool.nodes.GetNodeList, pb.GetNodeListRequest()) == unauth
    assert code_of(sqlite_pool.nodes.GetPoolPublicKey, pb.PoolPublicKeyRequest()) == unauth
    # The health check needs no token; the pool's public key, any user's.
    assert sqlite_pool.nodes.HealthCheck(pb.HealthCheckRequest()).healthy
    key = sqlite_pool.nodes.GetPoolPublicKey(pb.PoolPublicKeyRequest(), metadata=bearer(token)).public_key_pem
    assert "BEGIN PUBLIC KEY" in key


@pytest.mark.parametrize(
    "overrides",
    [
        {"memory_gb": -1},
        {"cpu_score": -5},
        {"gpu_memory_gb": -8},
        {"cpu_cores": 0},
        {"cpu_cores": 10**6},
        {"memory_gb": 2**31 - 1},
        {"gpu_score": 2**31 - 1},
        {"port": 0},
        {"port": 70000},
        {"port": -1},
        {"hostname": ""},
        {"hostname": "bad host"},
        {"hostname": "x" * 300},
        {"hostname": "a..b"},
        {"docker_status": "maybe"},
        {"location": "L" * 65},
        {"gpu_name": "\x00evil"},
    ],
)
def test_absurd_node_registrations_are_invalid(sqlite_pool: PoolHarness, overrides: dict) -> None:
    owner, token = sqlite_pool.new_user()
    request = node_request(owner, **overrides)
    assert code_of(sqlite_pool.nodes.RegisterWorkerNode, request, metadata=bearer(token)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


@pytest.mark.parametrize("node_id", ["", "/label", "{owner}/", "{owner}/bad label", "{owner}/" + "l" * 33])
def test_malformed_node_ids_are_invalid(sqlite_pool: PoolHarness, node_id: str) -> None:
    owner, token = sqlite_pool.new_user()
    request = node_request(node_id.format(owner=owner))
    assert code_of(sqlite_pool.nodes.RegisterWorkerNode, request, metadata=bearer(token)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_heartbeat_of_an_unregistered_node_is_refused_in_band(sqlite_pool: PoolHarness) -> None:
    owner, token = sqlite_pool.new_user()
    reply = sqlite_pool.nodes.ReportStatus(
        pb.ReportStatusRequest(node_id=owner, status_message="Idle"), metadata=bearer(token)
    )
    assert not reply.success and "not registered" in reply.message


def test_hostnames_are_shown_only_to_owner_and_operators(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, OPERATORS=["root_op"])
    owner, token = pool.new_user()
    _, stranger = pool.new_user()
    pool.register("root_op")
    operator = pool.login("root_op")
    assert pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token)).success
    assert listed(pool, stranger)[owner].hostname == "" and listed(pool, stranger)[owner].port == 0
    assert listed(pool, stranger)[owner].cpu_score == 1000  # the summary is still there
    assert listed(pool, operator)[owner].hostname == "127.0.0.1"


def test_public_address_policy_refuses_internal_targets(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, NODE_ADDRESS_POLICY="public")
    owner, token = pool.new_user()
    for host in (
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "192.168.0.10",
        "169.254.169.254",
        "::1",
        "224.0.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
    ):
        request = node_request(owner, hostname=host)
        with pytest.raises(grpc.RpcError) as info:
            pool.nodes.RegisterWorkerNode(request, metadata=bearer(token))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, host
        assert "public addresses" in info.value.details() or "resolve" in info.value.details()
    assert pool.nodes.RegisterWorkerNode(node_request(owner, hostname="8.8.8.8"), metadata=bearer(token)).success


def test_reregistering_after_restart_keeps_identity_and_resets_capacity(pool: PoolHarness) -> None:
    owner, token = pool.new_user()
    assert pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token)).success
    db = pool.ctx.db
    with db.reading() as session:
        before = nodes.get(session, owner)
    assert before is not None
    held = db.transaction(
        lambda s: allocation.allocate(
            s,
            node_pk=before.pk,
            task_id="t-restart",
            attempt=1,
            need=allocation.Need(cpu_score=900, memory_gb=15, gpu_score=0, gpu_memory_gb=0),
        )
    )
    assert held is not None
    # The machine restarts, with more memory now; it registers again under the same id.
    reply = pool.nodes.RegisterWorkerNode(node_request(owner, memory_gb=32), metadata=bearer(token))
    assert reply.success and "re-registered" in reply.message
    with db.reading() as session:
        after = nodes.get(session, owner)
        assert allocation.invariant_violations(session) == []
    assert after is not None and after.pk == before.pk
    assert after.available == after.capacity and after.capacity["memory_gb"] == 32
    assert after.running_tasks == 0
    # No stale "resource insufficient": the whole machine can be allocated again.
    again = db.transaction(
        lambda s: allocation.allocate(
            s,
            node_pk=after.pk,
            task_id="t-after",
            attempt=1,
            need=allocation.Need(cpu_score=1000, memory_gb=32, gpu_score=2000, gpu_memory_gb=8),
        )
    )
    assert again is not None


def test_silent_node_goes_offline_after_timeout_and_sweep(make_pool, database_url: str, celery_worker_for) -> None:
    pool = make_pool(database_url=database_url, NODE_HEARTBEAT_TIMEOUT=1.5)
    owner, token = pool.new_user()
    assert pool.nodes.RegisterWorkerNode(node_request(owner), metadata=bearer(token)).success
    db = pool.ctx.db
    with db.reading() as session:
        record = nodes.get(session, owner)
    assert record is not None
    held = db.transaction(
        lambda s: allocation.allocate(
            s, node_pk=record.pk, task_id="t-silent", attempt=1, need=allocation.Need(cpu_score=500, memory_gb=8)
        )
    )
    assert held is not None
    celery_worker_for(pool)
    sweep = pool.ctx.jobs.app

    # While it heartbeats, the sweep leaves it alone.
    for _ in range(3):
        pool.nodes.ReportStatus(
            pb.ReportStatusRequest(node_id=owner, status_message="Running 1 tasks"), metadata=bearer(token)
        )
        assert sweep.send_task("pool.maintenance.expire_heartbeats").get(timeout=30) == 0
        time.sleep(0.6)
    assert listed(pool, token)[owner].status == "busy"

    time.sleep(1.2)  # with the loop's last pause, 1.8 s of silence: past the timeout
    # (≥ 1: on the shared PostgreSQL database, nodes of earlier tests are silent too.)
    assert sweep.send_task("pool.maintenance.expire_heartbeats").get(timeout=30) >= 1
    assert listed(pool, token)[owner].status == "offline"
    with db.reading() as session:
        back = nodes.get(session, owner)
        assert allocation.invariant_violations(session) == []
    assert back is not None and back.available == back.capacity and back.status == "offline"
    # Running the sweep again changes nothing.
    assert sweep.send_task("pool.maintenance.expire_heartbeats").get(timeout=30) == 0

    # A heartbeat brings it back (heartbeats are written in batches, within HEARTBEAT_FLUSH_SECONDS).
    pool.nodes.ReportStatus(pb.ReportStatusRequest(node_id=owner, status_message="Idle"), metadata=bearer(token))
    deadline = time.monotonic() + 5
    while listed(pool, token)[owner].status != "idle" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listed(pool, token)[owner].status == "idle"

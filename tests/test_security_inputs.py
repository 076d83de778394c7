"""The original design's holes in what it took at face value, each test named after what it forbids.

Task ids that climb out of the data dir; node addresses that turn dispatch against the pool's own
network, checked when a node registers and again when the pool is about to dial it (the policy
may have tightened, or the name may resolve elsewhere now); a node whose answers carry NUL bytes.
Ownership, trust and money are in test_security_regressions.py.
"""

from __future__ import annotations

import random
import socket

import grpc
import pytest

import orchestration.dispatcher
import orchestration.nodes
from orchestration import scheduler
from orchestration.catalog import NodeCatalog
from protos import nodepool_pb2 as pb
from tests.adversary import trusted
from tests.contract_calls import every_method, invoke
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, dispatch_now, task_zip, upload, wait_status
from tests.test_economy import audit_ok
from tests.test_nodes_api import node_request

INVALID = grpc.StatusCode.INVALID_ARGUMENT


TRAVERSALS = [
    "..",
    "../jwt_secret",
    "../../pool.db",
    "tasks/../../jwt_secret",
    "/etc/passwd",
    "..\\..\\x",
    "%2e%2e%2fjwt_secret",
    "．．",
    "a\x00b",
    "~",
    ".",
    "t" * 65,
    "",
]
TASK_RPCS = [
    m
    for m in every_method()
    if "task_id" in m.input_type.fields_by_name and m.name not in ("ExecuteTask", "StopTaskExecution")
]


def test_traversal_through_task_ids_is_refused_in_every_task_rpc(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    (_, token) = pool.new_user()
    before = {p: p.stat().st_mtime_ns for p in pool.settings.DATA_DIR.rglob("*") if p.is_file()}
    for method in TASK_RPCS:
        for task_id in TRAVERSALS:
            if task_id == "" and method.name in ("UploadTask", "UploadTaskStream"):
                continue  # an empty id asks the pool to generate one
            request = getattr(pb, method.input_type.name)(task_id=task_id)
            for name, value in (("task_zip", task_zip()), ("result_zip", task_zip()), ("logs", "[]")):
                if name in method.input_type.fields_by_name:
                    setattr(request, name, value)
            outcome, _ = invoke(pool.channel, method, request, bearer(token))
            assert outcome == "INVALID_ARGUMENT", (method.name, task_id, outcome)
    after = {p: p.stat().st_mtime_ns for p in pool.settings.DATA_DIR.rglob("*") if p.is_file()}
    assert {p for p in after if after[p] != before.get(p)} <= {p for p in after if p.name.startswith("pool.db")}


INTERNAL_TARGETS = [
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "localhost",
    "::ffff:127.0.0.1",
    "2002:7f00:1::",
    "169.254.169.254",
    "100.64.0.1",
    "10.0.0.1",
    "fd00::1",
    "0.0.0.0",
]


def test_dispatch_turned_against_the_pools_own_network_is_refused(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, NODE_ADDRESS_POLICY="public")
    owner, token = pool.new_user()
    for host in [*INTERNAL_TARGETS, socket.gethostname()]:
        request = node_request(owner, hostname=host)
        assert code_of(pool.nodes.RegisterWorkerNode, request, metadata=bearer(token)) == INVALID, host


def test_dispatch_rechecks_the_address_when_the_policy_tightened(
    make_pool, sqlite_url: str, celery_worker_for, workers: list
) -> None:
    # Registered while the pool allowed any address; the dispatcher now runs with the public policy.
    pool = make_pool(database_url=sqlite_url, **FAST)
    node = ScriptedWorker(pool, owner=trusted(pool))
    workers.append(node)
    pool.env["NODE_ADDRESS_POLICY"] = "public"
    celery_worker_for(pool)
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    failed = wait_status(pool, submitter, task_id, "FAILED", timeout=60, kick=True)
    assert "address refused" in failed.message and "loopback" in failed.message
    assert node.incoming == []  # never dialled
    assert pool.balance(submitter) == 1000


def resolving(name: str, addresses: list[str]):  # type: ignore[no-untyped-def]
    real = orchestration.nodes.resolve_host
    return lambda host: addresses if host == name else real(host)


@pytest.mark.parametrize("call", ["ExecuteTask", "StopTaskExecution"])
def test_a_call_to_a_node_rechecks_a_name_that_resolves_elsewhere_now(
    make_pool, sqlite_url: str, monkeypatch, call: str
) -> None:
    # DNS rebinding: public when the node registered, loopback when the pool is about to dial it.
    pool = make_pool(database_url=sqlite_url, NODE_ADDRESS_POLICY="public")
    monkeypatch.setattr(orchestration.nodes, "resolve_host", resolving("rebind.example", ["93.184.216.34"]))
    owner, token = pool.new_user()
    assert pool.nodes.RegisterWorkerNode(node_request(owner, hostname="rebind.example"), metadata=bearer(token)).success
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    placed = scheduler.match_pending(pool.ctx.db, NodeCatalog(), pool.settings, rng=random.Random(7))
    assert placed == [(task_id, 1)]
    monkeypatch.setattr(orchestration.dispatcher, "resolve_host", resolving("rebind.example", ["127.0.0.1"]))
    if call == "ExecuteTask":
        outcome = dispatch_now(pool, task_id)
        assert not outcome.accepted
        said = outcome.reason
    else:
        channels = orchestration.dispatcher.Channels(1 << 20)
        said = orchestration.dispatcher.stop_execution(pool.ctx.db, pool.ctx.signer, channels, pool.settings, task_id)
    assert said.startswith("node address refused") and "loopback" in said, said


class NulAnswers(ScriptedWorker):
    """A hostile node: every answer to the pool carries NUL characters (PostgreSQL text cannot hold them)."""

    def ExecuteTask(self, request: pb.ExecuteTaskRequest, context: grpc.ServicerContext) -> pb.ExecuteTaskResponse:
        reply = super().ExecuteTask(request, context)
        return pb.ExecuteTaskResponse(success=reply.success, message=f"\x00{reply.message}\x00")

    def StopTaskExecution(
        self, request: pb.StopTaskExecutionRequest, context: grpc.ServicerContext
    ) -> pb.StopTaskExecutionResponse:
        reply = super().StopTaskExecution(request, context)
        return pb.StopTaskExecutionResponse(success=reply.success, message=f"\x00{reply.message}\x00")


def test_a_node_answering_with_nul_bytes_cannot_wedge_its_tasks(
    make_pool, postgres_url: str, celery_worker_for, workers: list
) -> None:
    pool = make_pool(database_url=postgres_url, **FAST)
    celery_worker_for(pool, wait_ready=False)
    refuser = NulAnswers(pool, label="refuser", script=Script(mode="refuse"), owner=trusted(pool), gpu_name="R")
    holder = NulAnswers(pool, label="holder", script=Script(mode="hold"), owner=trusted(pool), gpu_name="H")
    workers += [refuser, holder]
    _, token = pool.new_user()
    refused, held = upload(pool, token, gpu_name="R"), upload(pool, token, gpu_name="H")
    failed = wait_status(pool, token, refused, "FAILED", timeout=60, kick=True)
    assert "busy" in failed.message
    wait_status(pool, token, held, "RUNNING")
    assert pool.master.StopTask(pb.StopTaskRequest(task_id=held), metadata=bearer(token)).success
    assert "killed" in wait_status(pool, token, held, "STOPPED", timeout=30, kick=True).message
    assert pool.balance(token) == 1000
    audit_ok(pool)

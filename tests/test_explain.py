"""Why-pending over gRPC: the reason and per-filter counts, computed from the pool's real nodes.

The wording itself is table-tested through the pure policy in test_policies_matching.py; here the
RPC answers from the database, for the task's owner (or an operator) only.
"""

from __future__ import annotations

import grpc
import pytest

from orchestration.explain import PLACEABLE, filter_counts
from orchestration.policies import NodeView, Resources, TaskNeeds, Tier, TrustThresholds
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import code_of, upload


def explain(pool: PoolHarness, token: str, task_id: str) -> pb.ExplainPendingResponse:
    return pool.master.ExplainPending(pb.ExplainPendingRequest(task_id=task_id), metadata=bearer(token))


def counts(reply: pb.ExplainPendingResponse) -> dict[str, int]:
    return {f.filter: f.nodes for f in reply.filters}


def test_a_task_needing_more_memory_than_any_node_names_memory(pool: PoolHarness, workers: list) -> None:
    workers += [ScriptedWorker(pool, label=f"n{i}", memory_gb=16) for i in range(2)]
    _, token = pool.new_user()
    task_id = upload(pool, token, memory_gb=32)

    reply = explain(pool, token, task_id)

    assert reply.success and reply.status == "PENDING"
    assert reply.reason == "no online node has memory_gb ≥ 32"
    assert counts(reply)["memory_gb"] == 2
    assert sum(counts(reply).values()) == 2
    assert [f.filter for f in reply.filters][:3] == ["offline", "trust", "cpu_score"]


def test_a_low_tier_node_and_a_submitter_with_credit_50(pool: PoolHarness, workers: list) -> None:
    workers.append(ScriptedWorker(pool, docker_status="disabled"))  # no Docker: low tier
    _, token = pool.new_user()  # INITIAL_CREDIT_SCORE = 50
    task_id = upload(pool, token)

    reply = explain(pool, token, task_id)

    assert reply.status == "PENDING"
    assert reply.reason == "1 node fits but is low tier and your credit is 50 (100 needed)"
    assert counts(reply)["trust"] == 1


def test_with_no_node_at_all(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    reply = explain(pool, token, upload(pool, token))
    assert reply.reason == "no node is registered" and sum(counts(reply).values()) == 0


def test_a_task_that_is_not_pending_has_no_reason(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    task_id = upload(pool, token)
    stopped = pool.master.StopTask(pb.StopTaskRequest(task_id=task_id), metadata=bearer(token))
    assert stopped.success, stopped.message

    reply = explain(pool, token, task_id)

    assert reply.success and reply.status == "STOPPED"
    assert reply.reason == "" and list(reply.filters) == []


def test_only_the_owner_or_an_operator_may_ask(make_pool, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(database_url=sqlite_url, OPERATORS=["root_op"])
    _, owner = pool.new_user()
    _, stranger = pool.new_user()
    pool.register("root_op")
    operator = pool.login("root_op")
    task_id = upload(pool, owner)

    assert code_of(explain, pool, stranger, task_id) == grpc.StatusCode.PERMISSION_DENIED
    assert explain(pool, operator, task_id).status == "PENDING"
    missing = explain(pool, owner, "no-such-task")
    assert not missing.success and "no task" in missing.message
    assert code_of(explain, pool, owner, "../etc") == grpc.StatusCode.INVALID_ARGUMENT
    no_token = pool.master.ExplainPending
    assert code_of(no_token, pb.ExplainPendingRequest(task_id=task_id)) == grpc.StatusCode.UNAUTHENTICATED
    with_field = pool.master.ExplainPending(pb.ExplainPendingRequest(task_id=task_id, token=owner))
    assert with_field.status == "PENDING"


BIG = Resources(1000, 64, 0, 0)


def view(node_id: str, **changes: object) -> NodeView:
    fields: dict[str, object] = {
        "node_id": node_id,
        "tier": Tier.HIGH,
        "online": True,
        "capacity": BIG,
        "available": BIG,
    }
    fields.update(changes)
    return NodeView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fleet", "expected"),
    [
        ([], {}),
        ([view("a")], {}),
        ([view("a", online=False), view("b", tier=Tier.LOW)], {"offline": 1, "trust": 1}),
        (
            [view("a", available=Resources(1000, 2, 0, 0)), view("b", max_tasks=1, running_tasks=1)],
            {"memory_gb": 1, "task_cap": 1},
        ),
        ([view("a", available=Resources(10, 0, 0, 0))], {"cpu_score": 1}),  # first failing filter only
    ],
)
def test_filter_counts_each_node_once_at_its_first_failing_filter(
    fleet: list[NodeView], expected: dict[str, int]
) -> None:
    needs = TaskNeeds(Resources(100, 4, 0, 0), submitter_credit=50)
    found = dict(filter_counts(fleet, needs, TrustThresholds()))
    assert list(found) == [
        "offline",
        "trust",
        "cpu_score",
        "memory_gb",
        "gpu_score",
        "gpu_memory_gb",
        "gpu_name",
        "task_cap",
    ]
    assert {name: n for name, n in found.items() if n} == expected


def test_a_task_some_node_can_take_says_so(pool: PoolHarness, workers: list) -> None:
    workers.append(ScriptedWorker(pool))  # no Celery worker runs here, so the task stays PENDING
    _, token = pool.new_user()
    reply = explain(pool, token, upload(pool, token))
    assert reply.status == "PENDING" and reply.reason == PLACEABLE

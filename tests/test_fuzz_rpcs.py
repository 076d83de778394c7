"""Hypothesis throws random, boundary and malformed requests at every RPC over a real channel.

Two ways in, for every method of every service in the contract: well-formed messages whose fields
take any value of their type (huge and negative numbers, NULs, unicode, very long strings, random
bytes; mixed with real task ids, node ids, usernames and tokens so calls get past the first check),
and raw bytes that are no message at all. Whoever calls (any identity of the auth matrix), the pool
answers with a status a client can act on, never UNKNOWN or INTERNAL; afterwards it is healthy,
its ledger balances and its resource accounting holds. Runs on SQLite and on PostgreSQL.

The default run is short and deterministic. ``FUZZ_EXAMPLES=5000`` makes a long, random run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import allocation, ledger
from protos import nodepool_pb2 as pb
from tests.adversary import IDENTITIES, Scene, build_scene, module_database, module_pool, trusted
from tests.contract_calls import every_method, invoke, invoke_raw, rpc_name
from tests.fuzz_inputs import CRAFTED_BYTES, boundary_values, corrupted, requests_of, values_of
from tests.harness import bearer, unique_name
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import upload, wait_status
from tests.test_security_auth_matrix import MATRIX

LONG_RUN = "FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG_RUN,
    suppress_health_check=list(HealthCheck),
)
# Every answer a client can act on. UNKNOWN, INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED mean the pool failed.
ACCEPTABLE = {
    "OK",
    "REFUSED",
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "UNIMPLEMENTED",
}

METHODS = every_method()


@st.composite
def authorised_calls(draw: st.DrawFn, scene: Scene, method: MethodDescriptor) -> tuple[Message, str]:
    """A request the auth matrix says someone may make, with one to three fields replaced by fuzz."""
    build, expected = MATRIX[rpc_name(method)]
    allowed = [who for who, outcome in zip(IDENTITIES, expected, strict=True) if outcome in ("OK", "REFUSED")]
    identity = draw(st.sampled_from(allowed or list(IDENTITIES)))
    request = build(scene, identity)
    fields = [f for f in method.input_type.fields if not f.is_repeated and f.type != FieldDescriptor.TYPE_MESSAGE]
    if fields:
        for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name)):
            setattr(request, field.name, draw(values_of(scene, field)))
    return request, identity


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scene(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Scene]:
    operator = unique_name("op")
    # Generous login limits: the fuzzer's wrong passwords must not lock out the scene's users mid-run.
    with (
        module_database(request.param, tmp_path_factory, request) as url,
        module_pool(
            tmp_path_factory, redis_url, url, OPERATORS=[operator], LOGIN_FREE_FAILURES=10**6, LOGIN_LOCKOUT_AFTER=10**6
        ) as pool,
    ):
        built = build_scene(pool, operator)
        try:
            yield built
        finally:
            built.close()


def assert_pool_survived(scene: Scene) -> None:
    assert scene.pool.nodes.HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy
    with scene.pool.ctx.db.reading() as session:
        report = ledger.audit(session)
        assert report.ok, report.problems
        assert allocation.invariant_violations(session) == []


@pytest.mark.parametrize("method", METHODS, ids=rpc_name)
def test_any_field_values(scene: Scene, method: MethodDescriptor) -> None:
    scene.ensure_held()
    anyone = st.tuples(requests_of(scene, method.input_type), st.sampled_from(IDENTITIES))

    @FUZZ
    @given(case=st.one_of(authorised_calls(scene, method), anyone))
    def call(case: tuple[Message, str]) -> None:
        request, identity = case
        outcome, _ = invoke(scene.pool.channel, method, request, scene.metadata(identity))
        assert outcome in ACCEPTABLE, f"{rpc_name(method)} as {identity} answered {outcome} to {request!r:.500}"

    call()
    assert_pool_survived(scene)


@pytest.mark.parametrize("method", METHODS, ids=rpc_name)
def test_boundary_values_one_field_at_a_time(scene: Scene, method: MethodDescriptor) -> None:
    """Deterministic sweep: each field of an authorised request replaced by each boundary value."""
    build, expected = MATRIX[rpc_name(method)]
    allowed = [who for who, outcome in zip(IDENTITIES, expected, strict=True) if outcome in ("OK", "REFUSED")]
    failures = []
    for identity in allowed[:1] or ["none"]:
        for field in method.input_type.fields:
            for value in boundary_values(field):
                scene.ensure_held()
                request = build(scene, identity)
                setattr(request, field.name, value)
                outcome, _ = invoke(scene.pool.channel, method, request, scene.metadata(identity))
                if outcome not in ACCEPTABLE:
                    failures.append(f"{field.name}={value!r:.60} as {identity}: {outcome}")
    assert not failures, f"{rpc_name(method)}: {failures}"
    assert_pool_survived(scene)


@pytest.mark.parametrize("method", METHODS, ids=rpc_name)
def test_bytes_that_are_no_message(scene: Scene, method: MethodDescriptor) -> None:
    scene.ensure_held()
    broken = st.builds(
        corrupted,
        requests_of(scene, method.input_type).map(lambda message: message.SerializeToString()),
        st.sampled_from(["truncate", "flip", "splice"]),
        st.integers(0, 1 << 20),
        st.binary(min_size=1, max_size=32),
    )

    raws = st.one_of(st.sampled_from(CRAFTED_BYTES), st.binary(max_size=4096), broken)

    @FUZZ
    @given(raw=raws, identity=st.sampled_from(IDENTITIES))
    def call(raw: bytes, identity: str) -> None:
        outcome = invoke_raw(scene.pool.channel, method, raw, scene.metadata(identity))
        assert outcome in ACCEPTABLE, f"{rpc_name(method)} as {identity} answered {outcome} to raw {raw[:200]!r}"

    call()
    assert_pool_survived(scene)


def test_the_fuzzed_pool_still_does_its_job(scene: Scene) -> None:
    """After all that, a new node joins and a new user's task runs on it to completion."""
    pool = scene.pool
    node = ScriptedWorker(pool, owner=trusted(pool), gpu_name="fuzz-survivor")
    try:
        _, token = pool.new_user()
        task_id = upload(pool, token, gpu_name="fuzz-survivor")
        wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
        logs = pool.master.GetTaskLogs(pb.GetTaskLogsRequest(task_id=task_id), metadata=bearer(token))
        assert [record["message"] for record in json.loads(logs.logs)] == ["started", "low disk"]
        assert (task_id, 1) in node.executed  # (it may also pick up work the fuzzing left waiting)
    finally:
        node.close()
    assert_pool_survived(scene)

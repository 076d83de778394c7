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
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import allocation, ledger
from protos import nodepool_pb2 as pb
from tests.adversary import (
    IDENTITIES,
    Scene,
    build_scene,
    every_method,
    invoke,
    invoke_raw,
    message_class,
    module_database,
    module_pool,
    rpc_name,
    trusted,
)
from tests.harness import PASSWORD, bearer, unique_name
from tests.scripted_worker import ScriptedWorker
from tests.tasks_support import task_zip, upload, wait_status
from tests.test_security_auth_matrix import MATRIX
from tests.test_task_hostile import HOSTILE_ZIPS

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

NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\r\n\r\n",
    "\u202e\u200b\ufeff",
    "𝕳𝖎𝖛𝖊𝕸𝖎𝖓𝖉",
    "🙂" * 2000,
    "A" * 100_000,
    "../../../../etc/passwd",
    "..\\..\\windows",
    "%s%s%n%x",
    "' OR '1'='1' --",
    "${jndi:ldap://127.0.0.1/x}",
    "9" * 5000,
    "-1",
    "NaN",
]
NASTY_LOGS = [
    "[" * 100_000,
    '{"ts": 1' + "0" * 400 + "}",
    '{"level": 1' + "0" * 5000 + "}",
    '{"ts": 1e999, "message": "inf"}',
    '{"message": "nul \\u0000 inside", "level": "\\u0000"}',
    '[{"message": {"nested": [1, 2, {"x": null}]}}, "plain", {"msg": "short"}]',
    '"a json string"',
    "[1, 2, 3]",
    "null",
    '{"ts": "yesterday", "level": ["warn"]}',
]
INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Raw request bytes that are not messages: bad lengths, invalid UTF-8, overlong varints, deep groups.
CRAFTED_BYTES = [
    b"\x00",
    b"\xff" * 16,
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x0a\x80\x80\x80\x80\x08xyz",
    b"\x0a\x02\xc3\x28",
    b"\x12\x03\xed\xa0\x80",
    b"\x08" + b"\xff" * 11,
    b"\x0b" * 5000,
    b"\x0f",
    b"\x12",
    b"\x0a\x05abc",
]
METHODS = every_method()


def known_strings(scene: Scene, name: str) -> list[str]:
    """Values a field of this name really takes, so calls reach past the first validation."""
    users = [scene.user(who) for who in ("stranger", "node_owner", "submitter", "operator")]
    node = scene.worker.node_id
    return {
        "task_id": [scene.held_task, scene.done_task, scene.held_task.upper(), "..", "../jwt_secret", "t" * 65],
        "node_id": [node, node.upper(), f"{node}/fuzz", f"{scene.stranger[0]}/fuzz", f"{node}/../x"],
        "username": [*users, unique_name("fz")],
        "receiver_username": users,
        "user_id": users,
        "token": [scene.token(who) or "" for who in IDENTITIES] + ["e30.e30.e30"],
        "password": [PASSWORD, "x" * 72, "x" * 73, "é" * 40],
        "hostname": ["127.0.0.1", "localhost", "::1", "8.8.8.8", "169.254.169.254", "2130706433", "a..b", "a" * 254],
        "docker_status": ["enabled", "disabled", "available", "unavailable", " ENABLED ", "maybe"],
        "location": ["Any", "any", "Asia/Taipei"],
        "gpu_name": ["Any", "RTX 4090", "matrix-gpu-nobody-has"],
        "status_message": ["Idle", "Running 999 tasks"],
        "idempotency_key": ["fuzz-1", "k:1", "x" * 128, "x" * 129, "has space"],
        "logs": NASTY_LOGS,
        "output": ["line\nline", "x" * 5000],
    }.get(name, [])


def values_of(scene: Scene, field: FieldDescriptor) -> st.SearchStrategy[object]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        known = known_strings(scene, field.name)
        return st.one_of(
            *([st.sampled_from(known)] if known else []), st.sampled_from(NASTY_STRINGS), st.text(max_size=300)
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        zips = [task_zip(), *HOSTILE_ZIPS.values()]
        return st.one_of(st.sampled_from(zips), st.binary(max_size=2048), st.just(os.urandom(300_000)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind in INT_BOUNDS:
        low, high = INT_BOUNDS[kind]
        edges = [v for v in (low, high, 0, 1, -1, 2, 999, 65535, 65536, 10**12, 10**12 + 1) if low <= v <= high]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-5, 5)
    return st.nothing()  # nested messages: none in the requests of this contract


def requests_of(scene: Scene, descriptor: Descriptor) -> st.SearchStrategy[Message]:
    cls = message_class(descriptor)
    fields = {
        field.name: st.none() | values_of(scene, field)
        for field in descriptor.fields
        if not field.is_repeated and field.type != FieldDescriptor.TYPE_MESSAGE
    }
    return st.fixed_dictionaries(fields).map(lambda chosen: cls(**{k: v for k, v in chosen.items() if v is not None}))


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


def corrupted(valid: bytes, how: str, at: int, junk: bytes) -> bytes:
    """``valid`` truncated, with a byte flipped, or with junk spliced in at ``at`` (modulo its length)."""
    if not valid:
        return junk
    at %= len(valid)
    if how == "truncate":
        return valid[:at]
    if how == "flip":
        return valid[:at] + bytes([valid[at] ^ (junk[0] | 1)]) + valid[at + 1 :]
    return valid[:at] + junk + valid[at:]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scene(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Scene]:
    operator = unique_name("op")
    # Generous login limits: the fuzzer's wrong passwords must not lock out the scene's users mid-run.
    with module_database(request.param, tmp_path_factory, request) as url, module_pool(
        tmp_path_factory, redis_url, url, OPERATORS=[operator], LOGIN_FREE_FAILURES=10**6, LOGIN_LOCKOUT_AFTER=10**6
    ) as pool:
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


def boundary_values(field: FieldDescriptor) -> list[object]:
    """The values every field of this type is tried with, one field at a time."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return ["", "\x00", "a\x00b", "A" * 100_000, "𝕳\u202e🙂", "../../../../etc/passwd", "9" * 5000]
    if kind == FieldDescriptor.TYPE_BYTES:
        return [b"", os.urandom(300_000), HOSTILE_ZIPS["zip-slip"], HOSTILE_ZIPS["zip bomb"]]
    if kind in INT_BOUNDS:
        low, high = INT_BOUNDS[kind]
        return [low, high, -1, 0]
    if kind == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    return []


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

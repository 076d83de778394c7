"""What the RPC fuzzer sends: values of every protobuf field type, from the boundaries and nasty
strings to real ids of the scene under attack, whole requests built from them, and raw bytes that
are no message (truncated, flipped, spliced, or crafted to break a parser).
"""

from __future__ import annotations

import os

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.adversary import IDENTITIES, Scene
from tests.contract_calls import message_class
from tests.harness import PASSWORD, unique_name
from tests.tasks_support import task_zip
from tests.test_task_hostile import HOSTILE_ZIPS

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

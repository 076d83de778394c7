"""The wire contract: generated code is current, and nothing breaks existing HiveMind peers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos import nodepool_pb2 as pb
from tests.harness import REPO

SEED_FIELDS = {  # spot checks of numbers existing workers rely on (SPEC §10)
    "RegisterWorkerNodeRequest": {"gpu_name": 12, "docker_status": 13, "port": 9},
    "StoreLogsRequest": {"node_id": 1, "task_id": 2, "logs": 3, "timestamp": 4},
    "TaskCompletedRequest": {"task_id": 1, "node_id": 2, "success": 3},
    "GetBalanceResponse": {"success": 1, "message": 2, "balance": 3},
    "ExecuteTaskResponse": {"success": 1, "message": 2, "result": 3},
}


@pytest.mark.parametrize("message", sorted(SEED_FIELDS))
def test_field_numbers_are_the_seeds(message: str) -> None:
    fields = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert {name: fields[name].number for name in SEED_FIELDS[message]} == SEED_FIELDS[message]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    shutil.copy(REPO / "protos" / "nodepool.proto", tmp_path / "protos")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/nodepool.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("nodepool_pb2.py", "nodepool_pb2.pyi", "nodepool_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (REPO / "protos" / name).read_text(), f"protos/{name} is stale: run scripts/gen-protos"


def test_contract_is_wire_compatible_with_the_original() -> None:
    """`buf breaking` (WIRE rules) against protos/baseline. CI installs buf; locally it may be absent."""
    has_buf = shutil.which("buf") or (REPO / ".tools/node_modules/.bin/buf").exists()
    if not has_buf and os.environ.get("CI") != "true":
        pytest.skip("buf is not installed here (scripts/check-contract installs it from npm)")
    result = subprocess.run(["bash", "scripts/check-contract"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

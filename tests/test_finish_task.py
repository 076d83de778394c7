"""FinishTask: a node's last output lines, result zip and verdict in one call, on the real pool.

Everything sent is checked before anything is kept: a call refused for any part of it leaves the
task as it was, and the node can still end it (here with the three calls an older worker sends).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import pytest

from models import task_files
from orchestration.reports import MAX_OUTPUT_PAYLOAD
from protos import nodepool_pb2 as pb
from tests.adversary import trusted
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker, result_zip
from tests.tasks_support import poll, upload, wait_status

REFUSED = "REFUSED"


@dataclass
class Held:
    pool: PoolHarness
    node: ScriptedWorker
    submitter: str  # token
    task_id: str

    def finish(self, token: str | None = None, /, **fields: object) -> pb.StatusResponse:
        sent = {"task_id": self.task_id, "node_id": self.node.node_id, **fields}
        request = pb.FinishTaskRequest(**sent)  # type: ignore[arg-type]
        return self.pool.master.FinishTask(request, metadata=bearer(token or self.node.token), timeout=30)

    def answer(self, token: str | None = None, /, **fields: object) -> str:
        """The status code's name, or REFUSED for a refusal in-band (``success=false``), or OK."""
        try:
            return "OK" if self.finish(token, **fields).success else REFUSED
        except grpc.RpcError as error:
            return error.code().name

    def unchanged(self) -> bool:
        """Still RUNNING with only the lines the node sent when it began, and no result kept."""
        status = poll(self.pool, self.submitter, self.task_id)
        stored = self.pool.kept_file(self.task_id, task_files.RESULT_ZIP)
        return status.status == "RUNNING" and list(status.output) == list(Script().lines) and stored is None


@pytest.fixture
def held(fast_pool: PoolHarness, workers: list) -> Held:
    """A task RUNNING on a node that holds it until told otherwise."""
    return hold_a_task(fast_pool, workers)


def hold_a_task(pool: PoolHarness, workers: list) -> Held:
    """Upload a task and wait until it runs, with its first lines in, on a node that holds it."""
    node = ScriptedWorker(pool, script=Script(mode="hold"), owner=trusted(pool))
    workers.append(node)
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    wait_status(pool, submitter, task_id, "RUNNING")
    assert wait_until_output(pool, submitter, task_id)
    return Held(pool, node, submitter, task_id)


def wait_until_output(pool: PoolHarness, token: str, task_id: str) -> bool:
    """The node's first lines are in (it sends them as it begins)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if list(poll(pool, token, task_id).output) == list(Script().lines):
            return True
        time.sleep(0.05)
    return False


def test_the_last_lines_the_result_and_the_verdict_are_kept_together(held: Held) -> None:
    result = result_zip("finished\n")

    reply = held.finish(success=True, attempt=1, output="last line\nbye", result_zip=result)

    assert (reply.success, reply.message) == (True, "completion recorded")
    done = wait_status(held.pool, held.submitter, held.task_id, "COMPLETED")
    assert list(done.output) == [*Script().lines, "last line", "bye"]
    fetched = held.pool.master.GetTaskResult(
        pb.GetTaskResultRequest(task_id=held.task_id), metadata=bearer(held.submitter)
    )
    assert fetched.result_zip == result


def test_a_failure_with_no_result_or_lines_is_a_plain_verdict(held: Held) -> None:
    assert held.finish(success=False, attempt=1, message="exit code 2").success

    failed = wait_status(held.pool, held.submitter, held.task_id, "FAILED")
    assert failed.message == "exit code 2"
    assert list(failed.output) == list(Script().lines)  # no empty line added for the empty output
    assert held.pool.kept_file(held.task_id, task_files.RESULT_ZIP) is None


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"result_zip": b"not a zip at all"}, "INVALID_ARGUMENT"),
        ({"result_zip": result_zip(), "output": "x" * (MAX_OUTPUT_PAYLOAD + 1)}, "RESOURCE_EXHAUSTED"),
        ({"result_zip": result_zip(), "attempt": 2}, REFUSED),  # not the live attempt: in-band, as TaskCompleted
        ({"result_zip": result_zip(), "attempt": -1}, "INVALID_ARGUMENT"),
        ({"result_zip": result_zip(), "task_id": "../../etc/passwd"}, "INVALID_ARGUMENT"),
        ({"result_zip": result_zip(), "node_id": "someone/else"}, "PERMISSION_DENIED"),
    ],
    ids=["bad-zip", "oversized-output", "stale-attempt", "negative-attempt", "hostile-id", "other-node"],
)
def test_a_refused_finish_keeps_nothing_and_the_node_can_still_end_the_task(
    held: Held, fields: dict[str, object], code: str
) -> None:
    sent: dict[str, object] = {"success": True, "attempt": 1, "output": "last line", **fields}

    assert held.answer(**sent) == code

    assert held.unchanged()
    auth = bearer(held.node.token)
    held.pool.master.ReturnTaskResult(
        pb.ReturnTaskResultRequest(task_id=held.task_id, result_zip=result_zip(), attempt=1), metadata=auth
    )
    done = pb.TaskCompletedRequest(task_id=held.task_id, node_id=held.node.node_id, success=True, attempt=1)
    assert held.pool.master.TaskCompleted(done, metadata=auth).success
    assert list(wait_status(held.pool, held.submitter, held.task_id, "COMPLETED").output) == list(Script().lines)


def test_someone_elses_finish_is_denied(held: Held) -> None:
    _, stranger = held.pool.new_user()

    assert held.answer(stranger, success=True, attempt=1, output="mine now") == "PERMISSION_DENIED"
    assert held.unchanged()

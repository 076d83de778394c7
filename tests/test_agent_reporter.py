"""The node's conversation with the pool: login, registration, heartbeats, retries, reports.

Most tests talk to the recording pool (it can be told to fail calls); the first one talks to
the real pool's UserService and NodeManagerService, which are built.
"""

from __future__ import annotations

import grpc
import pytest

from agent.outcome import Outcome
from agent.reporter import Heartbeat, TaskReporter
from agent.session import LoginFailed, PoolSession, compute_backoff
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer, unique_name
from tests.recording_pool import RecordingPool, pool_signer, recording_pool, wait_until

__all__ = ["pool_signer", "recording_pool"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)
Unavailable, Unauthenticated, NotFound = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
)


def session_for(address: str, *, username: str = "alice", password: str = "correct-horse-battery", **kw: object):  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(address)
    registration = pb.RegisterWorkerNodeRequest(
        node_id=username, hostname="127.0.0.1", port=50053, cpu_cores=2, memory_gb=4, cpu_score=200,
        docker_status="disabled", location="Any",
    )  # fmt: skip
    options: dict[str, object] = {"sleep": lambda _: None}
    options.update(kw)
    return PoolSession(channel, username=username, password=password, registration=registration, **options)  # type: ignore[arg-type]


def test_the_session_works_against_the_real_pool(sqlite_pool: PoolHarness) -> None:
    name = unique_name("node")
    session = session_for(sqlite_pool.address, username=name, create_account=True)

    session.start()

    assert session.heartbeat("Idle") is True
    assert session.public_key() == sqlite_pool.ctx.signer.public_key_pem
    token = sqlite_pool.login(name, "correct-horse-battery")
    nodes = sqlite_pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(token)).nodes
    mine = [n for n in nodes if n.node_id == name]
    assert [(n.status, n.hostname, n.port, n.cpu_cores) for n in mine] == [("idle", "127.0.0.1", 50053, 2)]


def test_a_wrong_password_is_a_login_failure_with_the_pools_words(recording_pool: RecordingPool) -> None:
    recording_pool.passwords["alice"] = "something-else"

    with pytest.raises(LoginFailed, match="wrong username or password"):
        session_for(recording_pool.address).start()


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(0, 0.0, 0.25), (0, 1.0, 0.5), (1, 1.0, 1.0), (3, 0.5, 3.0), (10, 1.0, 30.0), (10, 0.0, 15.0)],
)
def test_backoff_grows_exponentially_with_jitter_and_a_cap(attempt: int, jitter: float, expected: float) -> None:
    assert compute_backoff(attempt, factor=0.5, jitter=jitter, max_backoff=30.0) == pytest.approx(expected)


def test_an_unavailable_pool_is_retried_with_backoff(recording_pool: RecordingPool) -> None:
    waits: list[float] = []
    session = session_for(recording_pool.address, sleep=waits.append, rng=lambda: 1.0)
    session.start()
    recording_pool.failures["StoreOutput"] = [Unavailable, Unavailable, Unavailable]

    reply = session.call(session.master.StoreOutput, pb.StoreOutputRequest(task_id="t", output="x"), name="StoreOutput")

    assert reply is not None and reply.success
    assert recording_pool.count("StoreOutput") == 4
    assert waits == [0.5, 1.0, 2.0]


def test_a_payload_the_pool_finds_too_large_is_not_sent_again(recording_pool: RecordingPool) -> None:
    """RESOURCE_EXHAUSTED without retry-after: over a limit, which the same call would meet again."""
    waits: list[float] = []
    session = session_for(recording_pool.address, sleep=waits.append, rng=lambda: 1.0)
    session.start()
    recording_pool.failures["ReturnTaskResult"] = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    request = pb.ReturnTaskResultRequest(task_id="t", result_zip=b"PK", attempt=1)

    assert session.call(session.master.ReturnTaskResult, request, name="ReturnTaskResult") is None
    assert recording_pool.count("ReturnTaskResult") == 1 and waits == []


def test_a_pool_that_says_when_to_retry_is_retried_no_sooner(recording_pool: RecordingPool) -> None:
    """RESOURCE_EXHAUSTED with retry-after (a rate limit): sent again, after at least that long."""
    waits: list[float] = []
    session = session_for(recording_pool.address, sleep=waits.append, rng=lambda: 1.0)
    session.start()
    busy = (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "3"),))
    recording_pool.failures["StoreOutput"] = [busy, busy]

    reply = session.call(session.master.StoreOutput, pb.StoreOutputRequest(task_id="t", output="x"), name="StoreOutput")

    assert reply is not None and reply.success
    assert recording_pool.count("StoreOutput") == 3
    assert waits == [3.0, 3.0]  # the backoff alone would be 0.5 s, then 1 s


def test_an_expired_token_means_logging_in_again(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool.address)
    session.start()
    recording_pool.failures["TaskCompleted"] = [Unauthenticated]

    reply = session.call(session.master.TaskCompleted, pb.TaskCompletedRequest(task_id="t"), name="TaskCompleted")

    assert reply is not None and reply.success
    calls = [(c.name, c.token) for c in recording_pool.calls if c.name in ("Login", "TaskCompleted")]
    assert calls == [
        ("Login", ""),
        ("TaskCompleted", "token-alice-1"),
        ("Login", ""),
        ("TaskCompleted", "token-alice-2"),
    ]


def test_errors_the_node_cannot_fix_are_given_up_without_raising(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool.address)
    session.start()
    recording_pool.failures["StoreOutput"] = [grpc.StatusCode.FAILED_PRECONDITION]
    recording_pool.failures["TaskCompleted"] = [Unavailable] * 20

    assert session.call(session.master.StoreOutput, pb.StoreOutputRequest(task_id="t"), name="StoreOutput") is None
    assert session.call(session.master.TaskCompleted, pb.TaskCompletedRequest(task_id="t"), name="x") is None
    assert recording_pool.count("TaskCompleted") == session.tries


def test_a_pool_that_is_not_there_never_crashes_a_report(dead_port: int) -> None:
    session = session_for(f"127.0.0.1:{dead_port}")

    assert session.call(session.master.StoreOutput, pb.StoreOutputRequest(task_id="t"), name="StoreOutput") is None
    assert session.heartbeat("Idle") is None


def test_heartbeats_report_what_the_node_is_doing(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool.address)
    session.start()
    running = [0]
    beat = Heartbeat(session, lambda: "Idle" if not running[0] else f"Running {running[0]} tasks", interval=0.05)

    beat.start()
    assert wait_until(lambda: recording_pool.count("ReportStatus") >= 3)
    running[0] = 2
    assert wait_until(lambda: recording_pool.of("ReportStatus")[-1].status_message == "Running 2 tasks")
    beat.stop()

    statuses = recording_pool.of("ReportStatus")
    assert statuses[0].status_message == "Idle" and statuses[0].node_id == "alice"
    assert {c.token for c in recording_pool.calls if c.name == "ReportStatus"} == {"token-alice-1"}


def test_a_task_report_batches_output_and_ends_with_result_and_verdict_in_one_call(
    recording_pool: RecordingPool,
) -> None:
    session = session_for(recording_pool.address)
    session.start()
    reporter = TaskReporter(session, "t9", 3, usage=lambda: (150.0, 2**30), cores=2, total_memory=4 * 2**30,
                            batch_lines=10, usage_seconds=0.0, flush_seconds=0.05)  # fmt: skip
    reporter.start()
    for i in range(25):
        reporter.output(f"line {i}")
    reporter.log("info", "started")
    assert wait_until(lambda: recording_pool.count("ReportRunningStatus") >= 1)  # after the lines went

    reporter.finish(Outcome(False, "exit code 3", RESULT, 3))

    names = [n for n in recording_pool.names(task_id="t9") if n != "ReportRunningStatus"]
    assert names[:3] == ["StoreOutput"] * 3 and names[-1] == "FinishTask" and "TaskCompleted" not in names
    outputs = recording_pool.of("StoreOutput")
    assert [len(r.output.split("\n")) for r in outputs] == [10, 10, 5]
    assert {r.attempt for r in outputs} == {3}
    usage = recording_pool.of("ReportRunningStatus")[0]
    assert (usage.cpu_usage, usage.memory_usage, usage.attempt, usage.node_id) == (75, 25, 3, "alice")
    done = recording_pool.of("FinishTask")[0]
    assert (done.success, done.message, done.attempt, done.node_id) == (False, "exit code 3", 3, "alice")
    assert (done.output, done.result_zip) == ("", RESULT)  # every line had gone already


RESULT = b"PK\x05\x06" + b"\0" * 18  # an empty zip


def test_the_last_lines_go_with_the_end_of_the_task(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool.address)
    session.start()
    reporter = TaskReporter(session, "tail", 1, batch_lines=10)

    for i in range(15):
        reporter.output(f"line {i}")
    reporter.finish(Outcome(True, "completed", RESULT, 0))

    assert recording_pool.names(task_id="tail") == ["StoreOutput", "FinishTask"]
    assert recording_pool.of("StoreOutput")[0].output == "\n".join(f"line {i}" for i in range(10))
    done = recording_pool.of("FinishTask")[0]
    assert (done.output, done.result_zip, done.success, done.message) == (
        "\n".join(f"line {i}" for i in range(10, 15)),
        RESULT,
        True,
        "",
    )


def test_to_a_pool_without_finish_task_a_node_ends_tasks_in_three_calls(recording_pool: RecordingPool) -> None:
    recording_pool.failures["FinishTask"] = [grpc.StatusCode.UNIMPLEMENTED] * 5  # as a pool that predates it
    session = session_for(recording_pool.address)
    session.start()

    for task_id in ("first", "second"):
        reporter = TaskReporter(session, task_id, 2, batch_lines=10)
        for i in range(15):
            reporter.output(f"line {i}")
        reporter.finish(Outcome(False, "exit code 1", RESULT, 1))

    three = ["StoreOutput", "StoreOutput", "ReturnTaskResult", "TaskCompleted"]
    assert recording_pool.names(task_id="first") == ["StoreOutput", "FinishTask", *three[1:]]
    assert recording_pool.names(task_id="second") == three  # the session remembers
    assert [len(r.output.split("\n")) for r in recording_pool.of("StoreOutput")] == [10, 5, 10, 5]
    assert [(d.success, d.message, d.attempt) for d in recording_pool.of("TaskCompleted")] == [
        (False, "exit code 1", 2)
    ] * 2
    assert [r.result_zip for r in recording_pool.of("ReturnTaskResult")] == [RESULT, RESULT]


def test_a_refused_finish_task_is_said_again_in_three_calls(recording_pool: RecordingPool) -> None:
    """A pool that knows FinishTask but refuses it (here: an answer a real pool gives to a result it
    does not take) still gets the verdict, through the calls that can each be refused alone."""
    recording_pool.failures["FinishTask"] = [grpc.StatusCode.INVALID_ARGUMENT]
    session = session_for(recording_pool.address)
    session.start()

    for task_id in ("refused", "next"):
        reporter = TaskReporter(session, task_id, 1)
        reporter.output("done")
        reporter.finish(Outcome(True, "completed", RESULT, 0))

    assert recording_pool.names(task_id="refused") == ["FinishTask", "StoreOutput", "ReturnTaskResult", "TaskCompleted"]
    assert recording_pool.names(task_id="next") == ["FinishTask"]  # FinishTask is still tried


def test_output_beyond_the_backlog_is_dropped_and_the_drop_is_said(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool.address)
    session.start()
    reporter = TaskReporter(session, "flood", 1, max_pending=100, batch_lines=1000)

    for i in range(250):
        reporter.output(f"line {i}")
    reporter.finish(Outcome(True, "completed"))

    assert [n for n in recording_pool.names(task_id="flood")] == ["FinishTask"]
    text = recording_pool.of("FinishTask")[0].output.split("\n")
    assert text[:100] == [f"line {i}" for i in range(100)]
    assert text[100:] == ["[hivemind-agent: 150 output lines dropped; the task printed faster than sent]"]

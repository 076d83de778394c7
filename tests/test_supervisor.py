"""The supervisor behind ``hivemind-pool up``, with real child processes."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pool.priority import autogroup_nice, lower
from pool.supervisor import READY_LINE, Child, Supervisor
from tests.processes import gone, wait_gone

SERVE = "import time; print('{name} listening', flush=True); time.sleep(60)"
# Forks a helper that stays in its process group, as Celery's prefork pool does.
SERVE_WITH_HELPER = (
    "import subprocess, sys, time\n"
    "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(f'helper {helper.pid}', flush=True)\n"
    "print('worker ready', flush=True)\n"
    "time.sleep(60)\n"
)
IGNORE_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('stubborn ready', flush=True)\n"
    "time.sleep(60)\n"
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop(timeout=1.0)


def test_prefixes_output_announces_ready_and_stops_every_process(
    out: io.StringIO, supervisors: list[Supervisor]
) -> None:
    supervisor = Supervisor(
        [
            Child("grpc", _python(SERVE.format(name="grpc")), ready_pattern=r"grpc listening"),
            Child("worker", _python(SERVE_WITH_HELPER), ready_pattern=r"worker ready$"),
        ],
        env=dict(os.environ),
        out=out,
    )
    supervisors.append(supervisor)

    supervisor.start(ready_message="gRPC on 127.0.0.1:50051")
    assert supervisor.wait_ready(timeout=10)

    lines = out.getvalue().splitlines()
    assert "[grpc]   grpc listening" in lines
    assert "[worker] worker ready" in lines
    assert lines.count(f"{READY_LINE}: gRPC on 127.0.0.1:50051") == 1
    helper_match = re.search(r"^\[worker\] helper (\d+)$", out.getvalue(), re.MULTILINE)
    assert helper_match is not None
    pids = [*supervisor.pids.values(), int(helper_match.group(1))]

    supervisor.stop(timeout=5)

    assert all(wait_gone(pid) for pid in pids)


def test_a_child_exiting_stops_the_others_and_fails_the_run(out: io.StringIO, supervisors: list[Supervisor]) -> None:
    supervisor = Supervisor(
        [
            Child("grpc", _python(SERVE.format(name="grpc")), ready_pattern="listening"),
            Child("beat", _python("import sys, time; time.sleep(0.3); sys.exit(3)")),
        ],
        env=dict(os.environ),
        out=out,
    )
    supervisors.append(supervisor)
    supervisor.start()

    code = supervisor.run_until_signal()

    assert code == 3
    assert "beat exited unexpectedly with code 3" in out.getvalue()
    assert gone(supervisor.pids["grpc"])


def test_wait_ready_gives_up_when_a_child_dies_first(out: io.StringIO, supervisors: list[Supervisor]) -> None:
    supervisor = Supervisor([Child("grpc", _python("raise SystemExit(2)"), "listening")], dict(os.environ), out=out)
    supervisors.append(supervisor)
    supervisor.start()

    started = time.monotonic()
    assert not supervisor.wait_ready(timeout=10)
    assert time.monotonic() - started < 5
    assert READY_LINE not in out.getvalue()


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(out: io.StringIO, supervisors: list[Supervisor]) -> None:
    supervisor = Supervisor([Child("stubborn", _python(IGNORE_SIGTERM), "ready")], dict(os.environ), out=out)
    supervisors.append(supervisor)
    supervisor.start()
    assert supervisor.wait_ready(timeout=10)
    pid = supervisor.pids["stubborn"]

    started = time.monotonic()
    supervisor.stop(timeout=0.5)

    assert 0.4 < time.monotonic() - started < 3
    assert gone(pid)


RUN_SUPERVISOR = f"""
import os, sys
from pool.supervisor import Child, Supervisor
child = Child("grpc", [sys.executable, "-c", {SERVE.format(name="grpc")!r}], ready_pattern="listening")
supervisor = Supervisor([child], dict(os.environ))
supervisor.start()
print("pid", supervisor.pids["grpc"], flush=True)
sys.exit(supervisor.run_until_signal())
"""


@pytest.mark.timeout(20)
def test_sigterm_stops_a_running_pool_cleanly() -> None:
    pool = subprocess.Popen(_python(RUN_SUPERVISOR), stdout=subprocess.PIPE, text=True)
    try:
        assert pool.stdout is not None
        child_pid, ready = None, False
        while child_pid is None or not ready:
            line = pool.stdout.readline()
            assert line, "the pool exited before it was ready"
            if line.startswith("pid "):
                child_pid = int(line.split()[1])
            ready = ready or line.startswith(READY_LINE)

        pool.send_signal(signal.SIGTERM)

        assert pool.wait(timeout=10) == 0
        assert "received SIGTERM; stopping" in pool.stdout.read()
        assert gone(child_pid)
    finally:
        pool.kill()
        pool.wait()


# Waits (10 s at most) until the supervisor has lowered it to nice WANT (and its autogroup, where
# there is one, to 3), then says what it runs at. The lowering may come before or after it starts.
SAY_PRIORITY = (
    "import os, time\n"
    "from pool.priority import autogroup_nice\n"
    "want, deadline = {want}, time.monotonic() + 10\n"
    "def lowered():\n"
    "    return os.getpriority(os.PRIO_PROCESS, 0) == want and autogroup_nice() in (None, 3)\n"
    "while not lowered() and time.monotonic() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print('nice', os.getpriority(os.PRIO_PROCESS, 0), 'autogroup', autogroup_nice(), flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_child_runs_its_nice_steps_below_the_supervisor(out: io.StringIO, supervisors: list[Supervisor]) -> None:
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    supervisor = Supervisor(
        [
            Child("grpc", _python(SAY_PRIORITY.format(want=want)), ready_pattern="^nice", nice=3),
            Child("worker", _python(SERVE.format(name="worker")), ready_pattern="listening"),
        ],
        env=dict(os.environ),
        out=out,
    )
    supervisors.append(supervisor)
    supervisor.start()
    assert supervisor.wait_ready(timeout=15), out.getvalue()

    said = re.search(r"^\[grpc\]\s+nice (-?\d+) autogroup (\S+)$", out.getvalue(), re.MULTILINE)
    assert said is not None, out.getvalue()
    assert int(said.group(1)) == want
    assert os.getpriority(os.PRIO_PROCESS, supervisor.pids["worker"]) == os.getpriority(os.PRIO_PROCESS, 0)
    # A new session's autogroup starts at nice 0, whatever autogroup (or none, as in a CI runner's
    # first session) the supervisor itself runs in; the lowered child's is 3 below its sibling's.
    if said.group(2) != "None":
        assert int(said.group(2)) == 3
        assert autogroup_nice(supervisor.pids["worker"]) == 0
    else:  # a kernel without autogroups: only the threads' nice applies
        assert autogroup_nice(supervisor.pids["worker"]) is None
    assert "kept a higher CPU priority" not in out.getvalue()


def test_lowering_a_process_that_is_gone_says_so_and_raises_nothing() -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    finished.wait()
    assert lower(finished.pid, 3) is not None
    assert lower(finished.pid, 0) is None  # nothing asked, nothing done

"""Running real tasks as real processes: output, results, limits, stopping, requirements.

Tests run as root here, so every task runs as an unprivileged per-task user (uid 43000+),
which is what makes the process limit bite. Limits are small (256 MB, 64 processes) so that
the hostile tasks end in about a second on a 2-core machine.
"""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.outcome import STOPPED, Outcome
from agent.runner import Runner, TaskRefused
from agent.task import TaskRun, TaskSpec
from tests.agent_fixtures import TASK_USERS, Events, agent_settings, make_zip, processes_of, small_limits, work_dir

__all__ = ["work_dir"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def runner(work_dir: Path) -> Runner:
    return Runner(agent_settings(work_dir))


def run_task(
    runner: Runner, files: Mapping[str, str | bytes], *, task_id: str = "t1", **spec: Any
) -> tuple[Outcome, Events]:
    events = Events()
    run = runner.prepare(TaskSpec(task_id, 1, **spec), make_zip(files))
    return run.run(events), events


def started(runner: Runner, files: dict[str, str | bytes]) -> tuple[TaskRun, Events, threading.Thread, list[Outcome]]:
    events = Events()
    run = runner.prepare(TaskSpec("bg", 1), make_zip(files))
    ended: list[Outcome] = []
    thread = threading.Thread(target=lambda: ended.append(run.run(events)))
    thread.start()
    return run, events, thread, ended


def result_files(outcome: Outcome) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(outcome.result_zip)) as archive:
        return {name: archive.read(name).decode() for name in archive.namelist()}


def test_a_task_prints_lines_reads_its_input_and_its_output_file_is_the_result(runner: Runner) -> None:
    main = (
        "import os\n"
        "print('starting')\n"
        "words = open('input.txt').read().split()\n"
        "for w in words: print('word', w)\n"
        "os.makedirs('output', exist_ok=True)\n"
        "open('output/result.txt', 'w').write(str(len(words)))\n"
    )

    outcome, events = run_task(runner, {"main.py": main, "input.txt": "alpha beta gamma"})

    assert (outcome.success, outcome.reason) == (True, "completed")
    assert events.lines == ["starting", "word alpha", "word beta", "word gamma"]
    assert result_files(outcome) == {"output/result.txt": "3"}


def test_run_sh_wins_and_runs_with_bash(runner: Runner) -> None:
    outcome, events = run_task(runner, {"run.sh": "echo from bash $BASH_VERSION | cut -c1-9", "main.py": "print('py')"})

    assert outcome.success
    assert events.lines == ["from bash"]


def test_a_task_runs_as_an_unprivileged_user_in_a_scrubbed_environment(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, work_dir: Path
) -> None:
    monkeypatch.setenv("HIVEMIND_PASSWORD", "hunter22-secret")
    secret = work_dir / "agent-secret.txt"
    secret.write_text("only root reads this")
    secret.chmod(0o600)
    main = (
        "import os\n"
        "print('uid', os.getuid())\n"
        "print('env', ' '.join(sorted(os.environ)))\n"
        "print('home', os.environ['HOME'] == os.getcwd())\n"
        f"try:\n    open({str(secret)!r}).read(); print('read the secret')\n"
        "except PermissionError: print('secret denied')\n"
    )

    outcome, events = run_task(runner, {"main.py": main})

    assert outcome.success, outcome.reason
    uid = int(events.lines[0].split()[1])
    assert (uid != 0) == (os.geteuid() == 0)
    assert "HIVEMIND_PASSWORD" not in events.lines[1] and "hunter22" not in "\n".join(events.lines)
    assert events.lines[1].split()[1:] == sorted(events.lines[1].split()[1:])
    assert "home True" in events.lines
    if os.geteuid() == 0:
        assert "secret denied" in events.lines


def test_exit_codes_become_reasons(runner: Runner) -> None:
    outcome, _ = run_task(runner, {"main.py": "import sys; print('bye'); sys.exit(3)"})

    assert (outcome.success, outcome.reason, outcome.exit_code) == (False, "exit code 3", 3)


def test_a_zip_without_entrypoint_is_refused_before_anything_runs(runner: Runner, work_dir: Path) -> None:
    with pytest.raises(TaskRefused, match="no entrypoint"):
        runner.prepare(TaskSpec("t2", 1), make_zip({"helper.py": "print(1)"}))

    assert list((work_dir / "tasks").iterdir()) == []


def test_a_zip_slip_is_refused_and_writes_nothing_outside(runner: Runner, work_dir: Path) -> None:
    from tests.agent_fixtures import raw_zip

    data = raw_zip([("main.py", b"print(1)", 0o100644), ("../../escaped.txt", b"pwned", 0o100644)])

    with pytest.raises(TaskRefused, match=r"unsafe task zip: .*'\.\.' in the path"):
        runner.prepare(TaskSpec("slip", 1), data)

    assert not (work_dir / "escaped.txt").exists()
    assert not (work_dir / "tasks" / "escaped.txt").exists()


def test_a_memory_hog_fails_with_the_memory_limit_as_reason(runner: Runner) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"

    start = time.monotonic()
    outcome, _ = run_task(runner, {"main.py": hog})

    assert not outcome.success
    assert "memory limit 256 MB exceeded" in outcome.reason
    assert time.monotonic() - start < 15


@pytest.mark.parametrize(
    "files",
    [
        {"run.sh": "echo uid $(id -u)\n:(){ :|:& };:\n"},
        {
            "main.py": "import os\nprint('uid', os.getuid(), flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        },
    ],
    ids=["bash", "python"],
)
def test_a_fork_bomb_is_contained_and_fails_with_the_process_limit_as_reason(
    runner: Runner, files: dict[str, str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the per-task user (and so RLIMIT_NPROC) needs the agent to run as root")
    start = time.monotonic()
    outcome, events = run_task(runner, files)

    assert not outcome.success
    assert "process limit 64 reached" in outcome.reason
    assert time.monotonic() - start < 15
    (uid,) = {int(line.split()[1]) for line in events.lines if line.startswith("uid ")}
    assert uid in TASK_USERS
    assert processes_of({uid}) == []  # this task's user, not one a test beside it runs a task as


def test_the_wall_clock_limit_kills_a_task_that_runs_too_long(work_dir: Path) -> None:
    runner = Runner(agent_settings(work_dir, limits=small_limits(max_minutes=0.05)))

    outcome, events = run_task(runner, {"main.py": "import time\nprint('sleeping', flush=True)\ntime.sleep(300)"})

    assert (outcome.success, outcome.reason) == (False, "killed: wall-clock limit 3 s")
    assert events.lines == ["sleeping"]


def test_stopping_a_task_kills_its_children_and_the_ones_that_escaped(runner: Runner) -> None:
    script = (
        "sleep 300 &\n"
        "echo child $!\n"
        "( sleep 301 & echo grandchild $! )\n"
        "setsid sleep 302 &\n"
        "echo escaped $!\n"
        "echo ready\n"
        "sleep 303\n"
    )
    run, events, thread, ended = started(runner, {"run.sh": script})
    assert events.wait_for(lambda lines: "ready" in lines), events.lines
    pids = [int(line.split()[1]) for line in events.lines if line.split()[0] in ("child", "grandchild", "escaped")]
    assert len(pids) == 3 and all(psutil.pid_exists(pid) for pid in pids)

    assert run.stop(STOPPED, wait=15)
    thread.join(timeout=15)

    assert ended[0].reason == "stopped by the pool" and not ended[0].success
    survivors = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert survivors == []


def test_a_task_that_exits_leaves_no_process_behind(runner: Runner) -> None:
    outcome, events = run_task(runner, {"run.sh": "nohup sleep 310 >/dev/null 2>&1 &\necho $!\n"})

    assert outcome.success
    pid = int(events.lines[0])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_a_task_that_nests_folders_without_end_is_reported_and_cleaned_up(runner: Runner, work_dir: Path) -> None:
    main = (
        "import os\n"
        "os.makedirs('output', exist_ok=True)\n"
        "os.chdir('output')\n"
        "for _ in range(1500):\n"
        "    os.mkdir('d')\n"
        "    os.chdir('d')\n"
        "open('bottom.txt', 'w').write('found')\n"
        "print('nested')\n"
    )

    outcome, events = run_task(runner, {"main.py": main})

    assert (outcome.success, outcome.reason) == (True, "completed"), outcome.reason
    assert events.lines == ["nested"]
    assert result_files(outcome) == {"output" + "/d" * 1500 + "/bottom.txt": "found"}
    assert list((work_dir / "tasks").iterdir()) == []  # its workspace removed, all 1,500 levels


def test_requirements_are_installed_into_the_task_venv(runner: Runner) -> None:
    main = "import six, sys\nprint('six', six.__version__)\nprint('venv', sys.prefix != sys.base_prefix)\n"

    outcome, events = run_task(runner, {"main.py": main, "requirements.txt": "six\n"})

    if not outcome.success and "pip install failed" in outcome.reason:
        pytest.skip(f"pip cannot reach any package index here: {outcome.reason}")
    assert outcome.success, outcome.reason
    assert events.lines[0].startswith("six 1.")
    assert events.lines[1] == "venv True"
    assert ("info", "requirements installed") in events.logs


def test_a_requirement_that_cannot_be_installed_fails_the_task_with_pips_words(runner: Runner) -> None:
    outcome, events = run_task(
        runner, {"main.py": "print('never runs')", "requirements.txt": "hivemind-no-such-package-xq7==9.9.9\n"}
    )

    assert not outcome.success
    assert outcome.reason.startswith("requirements.txt: pip install failed (exit code 1)")
    assert "hivemind-no-such-package-xq7" in outcome.reason
    assert events.lines == []


def test_a_result_over_the_limit_fails_the_task(work_dir: Path) -> None:
    runner = Runner(agent_settings(work_dir, limits=small_limits(result_max_bytes=50_000)))

    outcome, _ = run_task(runner, {"main.py": "import os\nopen('big.bin', 'wb').write(os.urandom(200_000))"})

    assert (outcome.success, outcome.reason) == (False, "the result is larger than 48.8 KB")


def test_a_work_dir_task_users_cannot_reach_is_refused_at_start(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a root agent runs tasks as other users")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)

    with pytest.raises(OSError, match="task users cannot reach"):
        Runner(agent_settings(closed / "work"))

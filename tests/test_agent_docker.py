"""The Docker path: the ``docker run`` argv (pure), and a real engine run where one exists.

There is no Docker engine on the machines this was written on: the argv tests and the task
wiring up to the engine call run everywhere; the engine tests skip, saying so, unless
``docker info`` answers.
"""

from __future__ import annotations

import io
import itertools
import zipfile
from pathlib import Path

import pytest

from agent import docker
from agent.machine import docker_available
from agent.runner import Runner
from agent.task import TaskSpec
from tests.agent_fixtures import Events, agent_settings, make_zip, work_dir

__all__ = ["work_dir"]  # the fixture, used by name

ENGINE = docker_available(timeout=5)
needs_engine = pytest.mark.skipif(
    not ENGINE, reason="no Docker engine answers `docker info` here: the engine call itself is not exercised"
)


def task(**changes: object) -> docker.DockerTask:
    values: dict[str, object] = {
        "name": "hivemind-job-1-2-abc123",
        "image": "python:3.11-slim",
        "workspace": Path("/work/tasks/job/workspace"),
        "command": ["python", "-u", "main.py"],
        "cpus": 2.0,
        "memory_mb": 512,
        "pids_limit": 64,
        "user": "43000:43000",
    }
    values.update(changes)
    return docker.DockerTask(**values)  # type: ignore[arg-type]


def test_the_run_argv_isolates_the_task() -> None:
    argv = docker.run_argv(task())

    assert argv[:5] == ["docker", "run", "--rm", "--name", "hivemind-job-1-2-abc123"]
    pairs = set(itertools.pairwise(argv))
    assert {
        ("--network", "none"),
        ("--cpus", "2"),
        ("--memory", "512m"),
        ("--memory-swap", "512m"),
        ("--pids-limit", "64"),
        ("--cap-drop", "ALL"),
        ("--security-opt", "no-new-privileges"),
        ("--user", "43000:43000"),
        ("-v", "/work/tasks/job/workspace:/workspace"),
        ("-w", "/workspace"),
    } <= pairs
    assert "--init" in argv
    assert argv[-4:] == ["python:3.11-slim", "python", "-u", "main.py"]
    assert [a for a in argv if a == "-v"] == ["-v"]  # the workspace is the only mount


def test_network_is_given_only_when_the_task_is_allowed_it() -> None:
    assert "--network" not in docker.run_argv(task(allow_network=True))


def test_a_task_with_requirements_gets_its_venv_read_only_and_on_the_path() -> None:
    argv = docker.run_argv(task(venv=Path("/work/tasks/job/venv")))

    assert "/work/tasks/job/venv:/venv:ro" in argv
    assert f"PATH={docker.CONTAINER_PATH}" in argv
    assert docker.CONTAINER_PATH.startswith("/venv/bin:")


def test_the_install_argv_builds_the_venv_with_network_and_a_read_only_workspace() -> None:
    argv = docker.install_argv(task(venv=Path("/v")))

    assert argv[argv.index("--name") + 1] == "hivemind-job-1-2-abc123-install"
    assert "--network" not in argv
    assert "/work/tasks/job/workspace:/workspace:ro" in argv and "/v:/venv" in argv
    assert argv[-3:-1] == ["sh", "-c"]
    assert "pip install" in argv[-1] and "/workspace/requirements.txt" in argv[-1]
    with pytest.raises(ValueError):
        docker.install_argv(task())


def test_kill_and_names() -> None:
    assert docker.kill_argv("c1") == ["docker", "kill", "c1"]
    assert docker.container_name("job.1", 2, "ff00aa") == "hivemind-job.1-2-ff00aa"


def test_a_docker_task_is_wired_up_to_the_engine_call(work_dir: Path) -> None:
    """Everything up to the engine: the workspace, the user, the argv the run would execute."""
    runner = Runner(agent_settings(work_dir), use_docker=True)
    run = runner.prepare(TaskSpec("dock", 1, memory_gb=1), make_zip({"main.py": "print('in a container')"}))
    try:
        argv, _ = run.command()
        assert argv[:3] == ["docker", "run", "--rm"]
        assert f"{run.root}:/workspace" in argv
        assert argv[argv.index("--memory") + 1] == "1024m"
        owner = argv[argv.index("--user") + 1]
        assert owner == (f"{run.user.uid}:{run.user.gid}" if run.user else owner)
        assert argv[-3:] == ["python", "-u", "main.py"]
    finally:
        run.stop(wait=0)
        runner.users.release(run.user)


@needs_engine
def test_a_task_runs_in_a_real_container(work_dir: Path) -> None:
    runner = Runner(agent_settings(work_dir), use_docker=True)
    events = Events()
    main = "import os\nos.makedirs('output')\nopen('output/r.txt', 'w').write('ok')\nprint('in a container')\n"

    outcome = runner.prepare(TaskSpec("dock-real", 1), make_zip({"main.py": main})).run(events)

    assert outcome.success, (outcome.reason, events.lines)
    assert "in a container" in events.lines
    assert zipfile.ZipFile(io.BytesIO(outcome.result_zip)).read("output/r.txt") == b"ok"


@needs_engine
def test_a_container_has_no_network_unless_allowed(work_dir: Path) -> None:
    runner = Runner(agent_settings(work_dir), use_docker=True)
    probe = (
        "import socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), 3); print('online')\n"
        "except OSError: print('offline')\n"
    )

    outcome = runner.prepare(TaskSpec("dock-net", 1), make_zip({"main.py": probe})).run(events := Events())

    assert outcome.success and events.lines == ["offline"]

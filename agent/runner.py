"""The runner: turns an accepted ExecuteTask into a :class:`agent.task.TaskRun`, or refuses it.

``Runner.prepare`` does everything that can refuse a task before it is accepted: checking and
unpacking its zip into a fresh workspace, finding its entrypoint, claiming a task user and
handing the workspace over to it. The subprocess path is described in :mod:`agent.sandbox`,
the Docker path in :mod:`agent.docker`, the run itself in :mod:`agent.task`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from agent import sandbox, workspace
from agent.settings import AgentSettings
from agent.task import Interpreter, Prepared, TaskRun, TaskSpec
from agent.taskusers import TaskUsers

log = logging.getLogger("agent.runner")

TASK_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# exit 0: venv and pip >= 22.3 (pip --python works); exit 3: venv only; anything else: unusable
PROBE = """
import sys, venv
try:
    import pip
    sys.exit(0 if tuple(int(x) for x in pip.__version__.split(".")[:2]) >= (22, 3) else 3)
except Exception:
    sys.exit(3)
"""
PROBE_LIMITS = sandbox.ProcessLimits(memory_mb=1024, cpu_seconds=30, nproc=64, nofile=256, file_size_mb=16)


def check_passable(folder: Path) -> None:
    """OSError unless every folder above ``folder`` lets other users through (``o+x``): tasks run
    as other users, and a workspace under ``/root`` (mode 0700) is out of their reach."""
    for parent in folder.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise OSError(
                f"task users cannot reach {folder}: {parent} is closed to other users; "
                "choose a --work-dir elsewhere (the default as root is /var/lib/hivemind-agent)"
            )


class TaskRefused(Exception):
    """The task cannot be accepted here; ``str(error)`` says why (answered success=false)."""


class Runner:
    """Prepares tasks on this machine, to run as subprocesses or Docker containers."""

    def __init__(self, settings: AgentSettings, *, use_docker: bool = False) -> None:
        """Raises OSError when the work dir cannot be created."""
        self.settings = settings
        self.use_docker = use_docker
        self.users = TaskUsers(settings.task_uid_base)
        self._interpreter: Interpreter | None = None
        self._interpreter_lock = threading.Lock()
        (settings.work_dir / "tasks").mkdir(parents=True, exist_ok=True)
        for folder in (settings.work_dir, settings.work_dir / "tasks"):
            folder.chmod(0o711)  # task users must pass through, not list
        if self.users.enabled:
            check_passable(settings.work_dir)

    def interpreter(self) -> Interpreter:
        """The first Python with ``venv`` a task user can run (found once); RuntimeError when none.

        Candidates: ``task_python`` if set, the agent's base interpreter, ``/usr/local/bin/python3``,
        ``/usr/bin/python3``. Each is tried as a task user, because an interpreter installed under
        root's home (pyenv) is not reachable by anyone else.
        """
        with self._interpreter_lock:
            if self._interpreter is None:
                self._interpreter = self._find_interpreter()
            return self._interpreter

    def _find_interpreter(self) -> Interpreter:
        named = [self.settings.task_python] if self.settings.task_python else []
        candidates = [*named, getattr(sys, "_base_executable", sys.executable), sys.executable]
        candidates += [path for path in ("/usr/local/bin/python3", "/usr/bin/python3") if os.path.exists(path)]
        user = self.users.acquire()
        try:
            for candidate in dict.fromkeys(candidates):
                env = sandbox.scrubbed_env(Path("/"), path_dirs=[])
                try:
                    proc = sandbox.spawn(
                        [candidate, "-c", PROBE], cwd=Path("/"), env=env, limits=PROBE_LIMITS, user=user
                    )
                    proc.communicate(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if proc.returncode in (0, 3):
                    log.info("tasks run with %s", candidate)
                    return Interpreter(candidate, pip_outside=proc.returncode == 0)
        finally:
            self.users.release(user)
        raise RuntimeError(f"no Python with venv that a task user can run among {candidates}")

    def prepare(self, spec: TaskSpec, task_zip: bytes) -> TaskRun:
        """Unpack ``task_zip`` into a fresh workspace for ``spec``; TaskRefused when it cannot run here."""
        if not TASK_ID_RE.fullmatch(spec.task_id) or set(spec.task_id) == {"."}:
            raise TaskRefused("task_id must be 1–64 letters, digits, '_', '.' or '-'")
        task_dir = self.settings.work_dir / "tasks" / f"{spec.task_id}.{spec.attempt}.{uuid.uuid4().hex[:6]}"
        space = task_dir / "workspace"
        user: sandbox.TaskUser | None = None
        try:
            workspace.extract(task_zip, space)
            root = workspace.task_root(space)
            entrypoint = workspace.choose_entrypoint(workspace.top_level_files(root))
            if entrypoint is None:
                raise TaskRefused(f"no entrypoint: the zip needs one of {', '.join(workspace.ENTRYPOINTS)}")
            if not self.use_docker:
                self.interpreter()
            user = self.users.acquire()
            sandbox.hand_over(task_dir, user)
        except workspace.UnsafeZip as error:
            self._discard(task_dir, user)
            raise TaskRefused(f"unsafe task zip: {error}") from None
        except TaskRefused:
            self._discard(task_dir, user)
            raise
        except (RuntimeError, OSError) as error:
            self._discard(task_dir, user)
            raise TaskRefused(f"cannot prepare the task: {error}") from None
        return TaskRun(
            self.settings,
            spec,
            Prepared(task_dir, root, entrypoint, user),
            interpreter=self.interpreter,
            release=self.users.release,
            use_docker=self.use_docker,
        )

    def _discard(self, task_dir: Path, user: sandbox.TaskUser | None) -> None:
        self.users.release(user)
        workspace.remove_tree(task_dir)

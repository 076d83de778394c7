"""One accepted task attempt: install its requirements, run its entrypoint, collect its result.

``TaskRun.run`` blocks until the task has ended and returns its
:class:`~agent.outcome.Outcome`, with every process of the task gone and (unless kept) its
workspace deleted. ``TaskRun.stop`` may be called from any thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from agent import docker, outcome, sandbox, workspace
from agent.outcome import Outcome
from agent.settings import AgentSettings
from agent.watchdog import Watchdog

log = logging.getLogger("agent.task")

REQUIREMENTS = "requirements.txt"


class TaskEvents(Protocol):
    """Where a running task's output lines and the agent's log records about it go."""

    def output(self, line: str) -> None: ...

    def log(self, level: str, message: str) -> None: ...


@dataclass(frozen=True)
class TaskSpec:
    """One attempt of a task as the pool asked for it (ExecuteTaskRequest, minus the zip)."""

    task_id: str
    attempt: int
    memory_gb: int = 0
    max_minutes: int = 0
    allow_network: bool = False


@dataclass(frozen=True)
class Interpreter:
    """The Python tasks run with, and whether its pip can install into a venv made without pip."""

    python: str
    pip_outside: bool


@dataclass(frozen=True)
class Prepared:
    """A task's unpacked workspace: the folder that holds it all, where its files start, what runs."""

    task_dir: Path
    root: Path
    entrypoint: str
    user: sandbox.TaskUser | None


class TaskRun:
    """One accepted task attempt. ``run`` once, from one thread; ``stop`` from any."""

    def __init__(
        self,
        settings: AgentSettings,
        spec: TaskSpec,
        prepared: Prepared,
        *,
        interpreter: Callable[[], Interpreter],
        release: Callable[[sandbox.TaskUser | None], None],
        use_docker: bool,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.task_dir, self.root, self.entrypoint, self.user = (
            prepared.task_dir,
            prepared.root,
            prepared.entrypoint,
            prepared.user,
        )
        self._interpreter = interpreter
        self._release = release
        self.use_docker = use_docker
        limits = settings.limits
        self.wall_seconds = (spec.max_minutes or limits.max_minutes) * 60
        self.memory_mb = spec.memory_gb * 1024 if spec.memory_gb > 0 else limits.memory_mb
        self.limits = sandbox.ProcessLimits(
            memory_mb=self.memory_mb,
            cpu_seconds=int(self.wall_seconds * (psutil.cpu_count() or 1)) + 10,
            nproc=limits.nproc,
            nofile=limits.nofile,
            file_size_mb=limits.file_size_mb,
        )
        self.before = workspace.snapshot(self.root)
        self._stop_reason: str | None = None
        self._ended = threading.Event()
        self._container = docker.container_name(spec.task_id, spec.attempt, uuid.uuid4().hex[:6])
        self.watchdog = Watchdog(cwd=self.root, user=self.user, stop_reason=lambda: self._stop_reason)

    def stop(self, reason: str = outcome.STOPPED, wait: float = 0.0) -> bool:
        """Ask the task to end with ``reason``; True when it has ended within ``wait`` seconds."""
        if self._stop_reason is None:
            self._stop_reason = reason
        return self._ended.wait(wait)

    def usage(self) -> tuple[float, int]:
        """(CPU percent summed over the task's processes, memory bytes), as last sampled."""
        return self.watchdog.usage

    def run(self, events: TaskEvents) -> Outcome:
        """Install requirements, run the entrypoint, collect the result, clean up. Never raises."""
        try:
            return self._run(events)
        except Exception as error:  # a bug or the machine failing; the pool must still hear of it
            log.exception("task %s failed inside the agent", self.spec.task_id)
            return Outcome(False, f"agent error: {type(error).__name__}: {error}")
        finally:
            self._release(self.user)  # kills anything the task left behind
            if not self.settings.keep_workspaces:
                workspace.remove_tree(self.task_dir)
            self._ended.set()

    def _run(self, events: TaskEvents) -> Outcome:
        venv = self.task_dir / "venv" if (self.root / REQUIREMENTS).is_file() else None
        if venv is not None:
            failure = self._install(venv, events)
            if failure:
                return Outcome(False, failure)
        argv, env = self.command(venv)
        events.log("info", f"starting {self.entrypoint} ({'docker' if self.use_docker else 'subprocess'})")
        container = self._container if self.use_docker else None
        ending = self.watchdog.run(
            argv, env, events.output, timeout=self.wall_seconds, limits=self.limits, container=container
        )
        limits = self.limits
        success, reason = outcome.explain_exit(
            ending.returncode,
            killed_for=ending.killed_for,
            tail=list(ending.tail),
            memory_mb=limits.memory_mb,
            nproc=limits.nproc,
            cpu_seconds=limits.cpu_seconds,
            file_size_mb=limits.file_size_mb,
            docker=self.use_docker,
        )
        events.log("info" if success else "error", f"{self.entrypoint} ended: {reason}")
        if ending.killed_for == outcome.SHUTTING_DOWN:
            return Outcome(success, reason, b"", ending.returncode)
        try:
            result = workspace.result_zip(
                self.root,
                self.before,
                max_bytes=self.settings.limits.result_max_bytes,
                owner_uid=self.user.uid if self.user else None,
            )
        except workspace.ResultTooLarge as error:
            events.log("error", str(error))
            result = b""
            if success:
                success, reason = False, str(error)
        if not success and not workspace.zip_entries(result):
            result = b""  # nothing worth uploading for a failed task
        return Outcome(success, reason, result, ending.returncode)

    def command(self, venv: Path | None = None) -> tuple[list[str], dict[str, str]]:
        """The argv and environment the entrypoint runs with (``venv``: the task's, if it has one)."""
        if self.use_docker:
            return docker.run_argv(self._docker_task(venv)), dict(os.environ)
        python = str(venv / "bin" / "python") if venv else self._interpreter().python
        bin_dir = self.task_dir / "bin"  # so that `python` works in run.sh even where only python3 exists
        bin_dir.mkdir(exist_ok=True)
        for name in ("python", "python3"):
            link = bin_dir / name
            if not link.is_symlink():
                link.symlink_to(python)
        path_dirs = [str(venv / "bin")] if venv else []
        extra = {"VIRTUAL_ENV": str(venv)} if venv else {}
        env = sandbox.scrubbed_env(self.root, path_dirs=[*path_dirs, str(bin_dir)], extra=extra)
        return workspace.entry_command(self.entrypoint, python), env

    def _docker_task(self, venv: Path | None) -> docker.DockerTask:
        owner = f"{self.user.uid}:{self.user.gid}" if self.user else f"{os.getuid()}:{os.getgid()}"
        return docker.DockerTask(
            name=self._container,
            image=self.settings.docker_image,
            workspace=self.root,
            command=workspace.entry_command(self.entrypoint, "python"),
            cpus=float(psutil.cpu_count() or 1),
            memory_mb=self.memory_mb,
            pids_limit=self.limits.nproc,
            allow_network=self.spec.allow_network,
            user=owner,
            venv=venv,
        )

    def _install(self, venv: Path, events: TaskEvents) -> str | None:
        """Build the task's venv from requirements.txt; the failure reason, or None."""
        limits = self.settings.limits
        timeout = limits.install_timeout_s
        events.log("info", "installing requirements.txt into the task's venv")
        if self.use_docker:
            venv.mkdir()
            sandbox.hand_over(venv, self.user)
            steps = [(docker.install_argv(self._docker_task(venv)), dict(os.environ))]
        else:
            env = sandbox.scrubbed_env(self.root, path_dirs=[], extra=self.settings.pip_env)
            found = self._interpreter()
            if found.pip_outside:
                make = [found.python, "-m", "venv", "--without-pip", str(venv)]
                pip = [found.python, "-m", "pip", "--python", str(venv / "bin" / "python")]
            else:
                make = [found.python, "-m", "venv", str(venv)]
                pip = [str(venv / "bin" / "python"), "-m", "pip"]
            flags = ["--no-input", "--disable-pip-version-check", "--no-cache-dir"]
            steps = [(make, env), ([*pip, "install", *flags, "-r", REQUIREMENTS], env)]
        install_limits = sandbox.ProcessLimits(
            memory_mb=max(limits.install_memory_mb, self.memory_mb),
            cpu_seconds=int(timeout) + 10,
            nproc=max(limits.nproc, 128),
            nofile=1024,
            file_size_mb=limits.file_size_mb,
        )
        deadline = time.monotonic() + timeout
        for argv, env in steps:
            ending = self.watchdog.run(
                argv,
                env,
                lambda line: events.log("info", f"pip: {line}"),
                timeout=max(1.0, deadline - time.monotonic()),
                limits=install_limits,
                container=f"{self._container}-install" if self.use_docker else None,
                timeout_reason=f"requirements.txt: installing took longer than {outcome.duration_text(timeout)}",
            )
            if ending.killed_for:
                return ending.killed_for
            if ending.returncode != 0:
                last = " | ".join(line.strip() for line in list(ending.tail)[-5:] if line.strip())
                return f"requirements.txt: pip install failed (exit code {ending.returncode}): {last}"[:2000]
        events.log("info", "requirements installed")
        return None

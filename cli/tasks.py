"""Task commands: submit, status, logs, result, stop, tasks, why."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from cli.app import command, state
from cli.client import Needs, PoolClient
from cli.errors import REFUSED, CliError
from cli.output import Output, short_time, status_text
from cli.packing import default_task_id, pack, total_size

TERMINAL = frozenset({"COMPLETED", "FAILED", "STOPPED"})
TaskId = Annotated[str, typer.Argument(help="The task id (as `hivemind submit` printed it).")]
Interval = Annotated[float, typer.Option(min=0.2, help="Seconds between two looks at the task.")]


def _progress(out: Output) -> Progress:
    """Progress bars on stderr, for people only (not with --json, nor when stderr is not a terminal)."""
    console = Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=out.json_mode or not console.is_terminal,
    )


@command()
def submit(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(exists=True, help="A folder (zipped without .git, __pycache__, .venv) or a zip.")
    ],
    cpu_score: Annotated[int, typer.Option(min=0, help="CPU score the task needs.")] = 0,
    memory_gb: Annotated[int, typer.Option(min=0, help="Memory (GB) the task needs.")] = 0,
    gpu_score: Annotated[int, typer.Option(min=0, help="GPU score the task needs.")] = 0,
    gpu_memory_gb: Annotated[int, typer.Option(min=0, help="GPU memory (GB) the task needs.")] = 0,
    gpu_name: Annotated[str, typer.Option(help="A GPU whose name contains this (Any: no constraint).")] = "Any",
    location: Annotated[str, typer.Option(help="Preferred node location (Any: no preference).")] = "Any",
    task_id: Annotated[str | None, typer.Option(help="Choose the task id (default: <name>-<random>).")] = None,
) -> None:
    """Upload a task; its maximum price is held in escrow until it ends."""
    s = state(ctx)
    s.login()  # before packing: say "log in" at once
    task_id = task_id or default_task_id(path)
    needs = Needs(cpu_score, memory_gb, gpu_score, gpu_memory_gb, gpu_name, location)
    upload_timeout = max(s.timeout, 300.0)
    with s.client() as client, _progress(s.out) as bars:
        packing = bars.add_task(f"packing {path.name}", total=total_size(path) or None)
        packed = pack(path, lambda n: bars.advance(packing, n))
        size = len(packed.data)
        sending = bars.add_task(f"uploading {task_id}", total=size)
        message = client.upload(task_id, packed.data, needs, upload_timeout, sent=lambda n: bars.advance(sending, n))
    if packed.skipped_links:
        s.out.note(f"left out {packed.skipped_links} symlink(s): the pool refuses zips that contain links")
    s.out.data({"task_id": task_id, "bytes": size, "files": packed.files, "message": message})
    s.out.say(f"{message} ({packed.files} files, {size} bytes). Watch it: hivemind status {task_id} --watch")


def _status_data(reply: Any) -> dict[str, Any]:
    return {"task_id": reply.task_id, "status": reply.status, "message": reply.message}


def _status_line(reply: Any) -> Text:
    return Text.assemble((datetime.now().strftime("%H:%M:%S "), "dim"), status_text(reply.status), f"  {reply.message}")


@command()
def status(
    ctx: typer.Context,
    task_id: TaskId,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the task until it ends.")] = False,
    interval: Interval = 2.0,
) -> None:
    """A task's status; with --watch, every change until it ends (exit 1 if it FAILED or was STOPPED)."""
    s = state(ctx)
    with s.client() as client:
        reply = client.poll(task_id)
        if not watch:
            s.out.data({**_status_data(reply), "output": list(reply.output)})
            s.out.say(Text(reply.task_id, style="bold"), "  ", status_text(reply.status), f"  {reply.message}")
            for line in list(reply.output)[-10:]:
                s.out.say(Text(line, style="dim"))
            return
        last = None
        while True:
            if (reply.status, reply.message) != last:
                last = (reply.status, reply.message)
                s.out.data(_status_data(reply))
                s.out.say(_status_line(reply))
            if reply.status in TERMINAL:
                break
            time.sleep(interval)
            reply = client.poll(task_id)
    if reply.status != "COMPLETED":
        raise typer.Exit(REFUSED)
    s.out.say(f"done. Output: hivemind logs {task_id}; result: hivemind result {task_id}")


def _log_text(record: dict[str, Any]) -> Text:
    try:
        at = datetime.fromtimestamp(float(record.get("ts", 0))).strftime("%H:%M:%S")
    except (TypeError, ValueError, OverflowError):
        at = "--:--:--"
    level = str(record.get("level", "")).upper()
    return Text(f"[node {at} {level}] {record.get('message', '')}", style="dim")


def _fetch(client: PoolClient, task_id: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    reply = client.poll(task_id)
    return reply.status, list(reply.output), client.logs(task_id)


@command()
def logs(
    ctx: typer.Context,
    task_id: TaskId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the task ends.")] = False,
    interval: Interval = 1.0,
) -> None:
    """What the task printed, and the node's log records about it."""
    s = state(ctx)
    with s.client() as client:
        task_status, output, records = _fetch(client, task_id)
        if not follow:
            s.out.data({"task_id": task_id, "status": task_status, "output": output, "logs": records})
            for line in output:
                s.out.say(line)
            for record in records:
                s.out.say(_log_text(record))
            if not output and not records:
                s.out.say(f"nothing yet (task is {task_status})")
            return
        shown_output = shown_logs = 0
        while True:
            for line in output[shown_output:]:
                s.out.data({"output": line})
                s.out.say(line)
            for record in records[shown_logs:]:
                s.out.data({"log": record})
                s.out.say(_log_text(record))
            shown_output, shown_logs = len(output), len(records)
            if task_status in TERMINAL:
                break
            time.sleep(interval)
            task_status, output, records = _fetch(client, task_id)
    s.out.data({"status": task_status})
    s.out.say(Text.assemble("task ended: ", status_text(task_status)))


@command()
def result(
    ctx: typer.Context,
    task_id: TaskId,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save it (default TASK-result.zip).")
    ] = None,
) -> None:
    """Download a finished task's result zip."""
    s = state(ctx)
    with s.client() as client:
        data = client.result(task_id, timeout=max(s.timeout, 300.0))
    path = output or Path(f"{task_id}-result.zip")
    try:
        path.write_bytes(data)
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    s.out.data({"task_id": task_id, "path": str(path), "bytes": len(data), "sha256": digest})
    s.out.say(f"saved the result of {task_id} to {path} ({len(data)} bytes, sha256 {digest[:12]}…)")


@command()
def stop(ctx: typer.Context, task_id: TaskId) -> None:
    """Stop a task (pending or running); the node is told to kill it."""
    s = state(ctx)
    with s.client() as client:
        message = client.stop(task_id)
    s.out.data({"task_id": task_id, "message": message})
    s.out.say(message)


@command()
def tasks(ctx: typer.Context) -> None:
    """Your tasks, newest first."""
    s = state(ctx)
    with s.client() as client:
        found = client.tasks()
    s.out.data(
        [
            {
                "task_id": t.task_id,
                "status": t.status,
                "node": t.assigned_node,
                "created_at": t.created_at,
                "updated_at": t.updated_at,
            }
            for t in found
        ]
    )
    s.out.table(
        ("TASK", "STATUS", "NODE", "CREATED", "UPDATED"),
        (
            (
                t.task_id,
                status_text(t.status),
                t.assigned_node or "-",
                short_time(t.created_at),
                short_time(t.updated_at),
            )
            for t in found
        ),
        empty="no tasks yet: hivemind submit FOLDER",
    )


@command()
def history(ctx: typer.Context, task_id: TaskId) -> None:
    """Every transition of a task, oldest first: when, from and to what, on which attempt and node, and why."""
    s = state(ctx)
    with s.client() as client:
        found = client.history(task_id)
    rows: list[dict[str, Any]] = [
        {
            "at": datetime.fromtimestamp(t.at).astimezone().isoformat(),
            "from": t.from_status,
            "to": t.to_status,
            "attempt": t.attempt,
            "node": t.node_id,
            "reason": t.reason,
        }
        for t in found
    ]
    s.out.data({"task_id": task_id, "transitions": rows})
    s.out.table(
        ("TIME", "FROM", "TO", "ATTEMPT", "NODE", "REASON"),
        (
            (
                short_time(str(r["at"])),
                str(r["from"] or "-"),
                status_text(str(r["to"])),
                str(r["attempt"]),
                str(r["node"] or "-"),
                str(r["reason"]),
            )
            for r in rows
        ),
        empty=f"no transition of {task_id} is recorded",
    )


@command()
def why(ctx: typer.Context, task_id: TaskId) -> None:
    """Why a task is still PENDING: the constraint no node meets, and how many nodes each filter turns away."""
    s = state(ctx)
    with s.client() as client:
        reply = client.explain(task_id)
    filters = {f.filter: f.nodes for f in reply.filters}
    s.out.data({"task_id": task_id, "status": reply.status, "reason": reply.reason, "filters": filters})
    if reply.status != "PENDING":
        s.out.say(f"task {task_id} is ", status_text(reply.status), ": it is not waiting for a node")
        return
    s.out.say(f"task {task_id} is ", status_text("PENDING"), f": {reply.reason}")
    s.out.table(
        ("FILTER", "NODES TURNED AWAY"),
        ((name, str(n)) for name, n in filters.items() if n),
        empty="no node is turned away by a filter",
    )

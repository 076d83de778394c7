"""``hivemind-agent``: lend this machine to a HiveMind node pool, or simulate a fleet of nodes.

This is the agent's only entrypoint that reads the environment (credentials, pip settings);
everything below it gets an :class:`agent.settings.AgentSettings`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import grpc
import typer

from agent.settings import AgentSettings, TaskLimits, default_work_dir, pip_environment

app = typer.Typer(help="HiveMind worker agent.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("agent.cli")
CA_CERT = typer.Option(
    "--ca-cert", envvar="HIVEMIND_CA_CERT", help="PEM CA certificate: talk TLS to a pool that serves it."
)
POOL_KEY_HELP = "The pool's Ed25519 public key (PEM file), instead of asking the pool for it."


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM, so shutdown is an orderly path, not an exception."""
    stopping = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stopping


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    pool: str = typer.Option("127.0.0.1:50051", "--pool", envvar="HIVEMIND_POOL", help="The pool, HOST:PORT."),
    username: str = typer.Option("", envvar="HIVEMIND_USERNAME", help="Your pool account (prompted if absent)."),
    password: str = typer.Option("", envvar="HIVEMIND_PASSWORD", help="Its password (prompted if absent)."),
    register: bool = typer.Option(False, "--register", help="Create the account first if it does not exist."),
    label: str = typer.Option("", help="Node label, for owners of several machines: node id USERNAME/LABEL."),
    host: str = typer.Option("127.0.0.1", help="The address the pool dials to reach this node."),
    port: int = typer.Option(50053, help="Port of this node's WorkerNodeService."),
    bind: str = typer.Option("0.0.0.0", help="Interface the node's server listens on."),
    work_dir: Annotated[Path | None, typer.Option(help="Where task workspaces live.")] = None,
    docker: str = typer.Option("auto", help="auto: run tasks in Docker when an engine answers; never: subprocesses."),
    pool_key: Annotated[
        Path | None, typer.Option(help="The pool's Ed25519 public key (PEM), not asking the pool.")
    ] = None,
    ca_cert: Annotated[Path | None, CA_CERT] = None,
    max_tasks: int = typer.Option(0, help="Tasks run at once (0: one per CPU core)."),
    location: str = typer.Option("Any", help="Location reported to the pool."),
    task_memory_mb: int = typer.Option(2048, help="Memory limit of a task that asks for none."),
    task_minutes: float = typer.Option(60.0, help="Wall-clock limit of a task that asks for none."),
    log_level: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Lend this machine to the pool: register, heartbeat and run the pool's tasks until Ctrl-C."""
    from agent import machine as machine_mod
    from agent.node import serve
    from agent.server import settle
    from agent.session import LoginFailed

    _logging(log_level)
    if docker not in ("auto", "never"):
        raise typer.BadParameter("--docker must be auto or never")
    username = username or typer.prompt("Pool username")
    password = password or typer.prompt("Password", hide_input=True)
    settings = AgentSettings(
        pool=pool,
        username=username,
        password=password,
        label=label,
        host=host,
        port=port,
        bind=bind,
        work_dir=work_dir or default_work_dir(),
        docker=docker,
        pool_key_file=pool_key,
        pool_ca_cert=ca_cert,
        max_tasks=max_tasks,
        location=location,
        limits=TaskLimits(memory_mb=task_memory_mb, max_minutes=task_minutes),
        pip_env=pip_environment(dict(os.environ)),
    )
    stopping = _stop_on_signals()
    machine = machine_mod.measure(location=location, use_docker=docker == "auto")
    typer.echo(
        f"machine: {machine.cpu_cores} cores, {machine.memory_gb} GB, cpu_score {machine.cpu_score}, "
        f"GPU {machine.gpu_name or 'none'}, Docker {machine.docker_status}"
    )
    settle()  # this process's own: its imports stay out of the collector's full passes
    try:
        serve(settings, machine, stopping, create_account=register)
    except LoginFailed as error:
        typer.echo(f"login refused by the pool: {error}", err=True)
        raise typer.Exit(2) from None
    except grpc.RpcError as error:
        typer.echo(f"the pool at {pool} answered {error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None
    except (RuntimeError, OSError, ValueError) as error:
        typer.echo(f"cannot start the node: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo("node stopped")


@app.command()
def simulate(
    pool: str = typer.Option("127.0.0.1:50051", "--pool", envvar="HIVEMIND_POOL", help="The pool, HOST:PORT."),
    nodes: int = typer.Option(10, "--nodes", min=1, help="How many virtual nodes."),
    prefix: str = typer.Option("sim", help="Account names are PREFIX00000, PREFIX00001, …"),
    password: str = typer.Option(
        "simulated-node-password", envvar="HIVEMIND_SIM_PASSWORD", help="Password of every virtual account."
    ),
    task_seconds: float = typer.Option(0.0, help="How long a simulated task takes."),
    heartbeat_seconds: float = typer.Option(
        0.0, help="Seconds between two heartbeats of one node (0: 5 s, or slower so the fleet sends at most 500/s)."
    ),
    host: str = typer.Option("127.0.0.1", help="The address the pool dials to reach the fleet."),
    port: int = typer.Option(50060, help="Port of the fleet's one WorkerNodeService (0: any free port)."),
    connections: int = typer.Option(
        4, min=1, help="Connections to the pool the nodes spread over (a pool's server processes share them)."
    ),
    pool_key: Annotated[
        Path | None, typer.Option(help="The pool's Ed25519 public key (PEM), not asking the pool.")
    ] = None,
    ca_cert: Annotated[Path | None, CA_CERT] = None,
    register: bool = typer.Option(True, "--register/--no-register", help="Create the accounts that do not exist."),
    heartbeat_process: bool = typer.Option(
        False, "--heartbeat-process", help="Heartbeats from a process of their own (big fleets, busy machines)."
    ),
    token_file: Annotated[Path | None, typer.Option(help="Where the nodes' tokens are kept between runs.")] = None,
    forget_tokens: bool = typer.Option(False, "--forget-tokens", help="Log every node in afresh."),
    log_level: str = typer.Option("WARNING", help="Log level."),
) -> None:
    """Serve NODES virtual worker nodes from this one process, for load tests and demos."""
    from agent.fleet import FleetSpec
    from agent.server import settle
    from agent.simulation import serve_fleet

    _logging(log_level)
    spec = FleetSpec(
        prefix=prefix,
        count=nodes,
        password=password,
        host=host,
        port=port,
        task_seconds=task_seconds,
        heartbeat_seconds=heartbeat_seconds,
        connections=connections,
        create_accounts=register,
        heartbeat_process=heartbeat_process,
    )
    tokens = None if forget_tokens else token_file or default_work_dir() / "fleet" / f"{prefix}@{pool}.json"
    stopping = _stop_on_signals()
    settle()
    try:
        serve_fleet(
            pool, spec, stopping, pool_key_file=pool_key, ca_cert=ca_cert, token_file=tokens, progress=typer.echo
        )
    except grpc.RpcError as error:
        typer.echo(f"the pool at {pool} answered {error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None
    except (RuntimeError, OSError, ValueError) as error:
        typer.echo(f"cannot start the fleet: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo("fleet stopped")


def main() -> None:
    app()

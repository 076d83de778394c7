"""Account commands: register, login, logout, balance, transfer; and the node list."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import typer
from rich.text import Text

from cli.app import command, state
from cli.credentials import Login
from cli.errors import UNREACHABLE, CliError
from cli.output import status_text

Password = Annotated[
    str | None,
    typer.Option(envvar="HIVEMIND_PASSWORD", show_envvar=True, help="The password (prompted for when absent)."),
]
Username = Annotated[str | None, typer.Argument(envvar="HIVEMIND_USERNAME", help="Your pool username.")]


@command()
def register(ctx: typer.Context, username: Username = None, password: Password = None) -> None:
    """Create an account on the pool (new accounts start with the pool's initial CPT balance)."""
    s = state(ctx)
    username = username or typer.prompt("Username")
    password = password or typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with s.client(anonymous=True) as client:
        message = client.register(username, password)
    s.out.data({"pool": s.pool, "username": username, "message": message})
    s.out.say(f"{message}. Next: hivemind login {username}")


@command()
def login(ctx: typer.Context, username: Username = None, password: Password = None) -> None:
    """Log in and keep the token (readable only by you) for the next commands."""
    s = state(ctx)
    username = username or typer.prompt("Username")
    password = password or typer.prompt("Password", hide_input=True)
    with s.client(anonymous=True) as client:
        token = client.login(username, password)
    try:
        s.store.save(s.pool, Login(username, token))
    except OSError as error:
        raise CliError(f"logged in, but cannot keep the token in {s.store.path}: {error.strerror}") from None
    s.out.data({"pool": s.pool, "username": username, "credentials": str(s.store.path)})
    s.out.say(f"logged in to {s.pool} as {username}")


@command()
def logout(ctx: typer.Context) -> None:
    """Forget the token kept for this pool."""
    s = state(ctx)
    gone = s.store.forget(s.pool)
    s.out.data({"pool": s.pool, "username": gone.username if gone else None})
    s.out.say(f"logged out of {s.pool} ({gone.username})" if gone else f"not logged in to {s.pool}")


@command()
def balance(ctx: typer.Context) -> None:
    """Your CPT balance."""
    s = state(ctx)
    username = s.login().username
    with s.client() as client:
        amount = client.balance()
    s.out.data({"username": username, "balance": amount})
    s.out.say(Text(f"{amount} CPT", style="bold"))


@command()
def transfer(
    ctx: typer.Context,
    receiver: Annotated[str, typer.Argument(help="Who receives the CPT.")],
    amount: Annotated[int, typer.Argument(min=1, help="Whole CPT to send.")],
    key: Annotated[
        str | None,
        typer.Option(help="Idempotency key: re-running with the same key never pays twice (default: a new one)."),
    ] = None,
) -> None:
    """Send CPT to another user."""
    s = state(ctx)
    key = key or uuid.uuid4().hex
    try:
        with s.client() as client:
            message = client.transfer(receiver, amount, key)
    except CliError as error:
        if error.exit_code == UNREACHABLE:  # it may or may not have been applied
            raise CliError(f"{error}; to retry without paying twice: --key {key}", error.exit_code) from None
        raise
    s.out.data({"receiver": receiver, "amount": amount, "key": key, "message": message})
    s.out.say(message)


def _ago(seconds: float) -> str:
    if seconds <= 0:
        return "never"
    delta = max(0, int(time.time() - seconds))
    return f"{delta}s ago" if delta < 120 else f"{delta // 60}m ago"


@command()
def nodes(ctx: typer.Context) -> None:
    """The pool's worker nodes (hostnames only for your own, unless you are an operator)."""
    s = state(ctx)
    with s.client() as client:
        found = client.node_list()
    s.out.data(
        [
            {
                "node_id": n.node_id,
                "status": n.status,
                "cpu_cores": n.cpu_cores,
                "cpu_score": n.cpu_score,
                "memory_gb": n.memory_gb,
                "gpu_score": n.gpu_score,
                "gpu_memory_gb": n.gpu_memory_gb,
                "gpu_name": n.gpu_name,
                "location": n.location,
                "hostname": n.hostname,
                "port": n.port,
                "last_heartbeat": n.last_heartbeat,
            }
            for n in found
        ]
    )
    s.out.table(
        ("NODE", "STATUS", "CORES", "CPU", "MEM GB", "GPU", "GPU GB", "GPU NAME", "LOCATION", "SEEN"),
        (
            (
                n.node_id,
                status_text(n.status),
                str(n.cpu_cores),
                str(n.cpu_score),
                str(n.memory_gb),
                str(n.gpu_score),
                str(n.gpu_memory_gb),
                n.gpu_name or "-",
                n.location or "-",
                _ago(n.last_heartbeat),
            )
            for n in found
        ),
        empty="no node is registered",
    )

"""The ``hivemind`` command: global options, per-invocation state, and one error path for all commands."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cli.client import PoolClient
from cli.credentials import CredentialStore, Login
from cli.errors import USAGE, CliError
from cli.output import Output

DEFAULT_POOL = "localhost:50051"
F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="Use a HiveMind node pool: your account, CPT balance, and the tasks you run on volunteers' machines.",
    no_args_is_help=True,
    add_completion=False,
)


@dataclass
class State:
    """What every command of one invocation shares."""

    pool: str
    timeout: float
    ca_cert: Path | None
    out: Output
    store: CredentialStore

    def login(self) -> Login:
        """The stored login for this pool; CliError (usage) when there is none."""
        found = self.store.get(self.pool)
        if found is None:
            raise CliError(f"not logged in to {self.pool}: run `hivemind login USERNAME`", USAGE)
        return found

    def client(self, *, anonymous: bool = False) -> PoolClient:
        token = None if anonymous else self.login().token
        return PoolClient(self.pool, token=token, timeout=self.timeout, ca_cert=self.ca_cert)


def state(ctx: typer.Context) -> State:
    """The invocation's state (set by the app callback)."""
    obj = ctx.find_root().obj
    assert isinstance(obj, State), "the app callback sets the state"
    return obj


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a command whose CliErrors end the run with one ``error:`` line and their exit code."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except CliError as error:
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(error.exit_code) from None

        app.command(name)(run)
        return function

    return decorate


def _version(show: bool) -> None:
    if show:
        try:
            typer.echo(f"hivemind {metadata.version('hivemind-node-pool')}")
        except metadata.PackageNotFoundError:
            typer.echo("hivemind (version unknown)")
        raise typer.Exit()


@app.callback()
def options(
    ctx: typer.Context,
    pool: Annotated[str, typer.Option("--pool", envvar="HIVEMIND_POOL", help="The pool, HOST:PORT.")] = DEFAULT_POOL,
    json_mode: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for each answer from the pool.")] = 30.0,
    ca_cert: Annotated[
        Path | None,
        typer.Option(envvar="HIVEMIND_CA_CERT", help="PEM CA certificate: talk TLS to a pool that serves it."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Global options come before the command: ``hivemind --pool pool.example:50051 --json tasks``."""
    ctx.obj = State(
        pool=pool,
        timeout=timeout,
        ca_cert=ca_cert,
        out=Output(json_mode),
        store=CredentialStore.for_user(os.environ),
    )

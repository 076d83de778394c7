"""``hivemind-pool``: the operator's command (up, serve, migrate, audit)."""

from __future__ import annotations

import sys

import typer

from pool.logs import configure_logging
from pool.settings import Settings

app = typer.Typer(help="Run and operate the HiveMind Node Pool.", no_args_is_help=True, add_completion=False)


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings)
    return settings


@app.command()
def up(
    flower: bool = typer.Option(False, "--flower", help="Also run Flower (Celery monitoring)."),
    flower_port: int = typer.Option(5555, help="Flower's HTTP port."),
    concurrency: int = typer.Option(
        0,
        help="Processes of the Celery worker for dispatch, maintenance and archival; 0 means 3 "
        "(the jobs mostly wait on the database and on nodes). Matching has a worker of one process besides.",
    ),
) -> None:
    """Run the whole pool: gRPC server, matcher, Celery worker and beat (private Redis and SQLite by default)."""
    from pool.up import WORKER_PROCESSES, run

    processes = concurrency or WORKER_PROCESSES
    raise typer.Exit(run(_settings(), flower=flower, flower_port=flower_port, concurrency=processes))


@app.command()
def serve(
    replica: int = typer.Option(
        0, min=0, help="This process's number among gRPC servers sharing the port (metrics on METRICS_PORT + N)."
    ),
) -> None:
    """Run the gRPC server only (Celery workers and beat run separately)."""
    from api.server import serve as run_server

    run_server(_settings(), replica=replica)


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    from models import schema
    from models.db import Database

    settings = _settings()
    db = Database(settings.database_url)
    schema.upgrade(db.engine)
    typer.echo(f"schema is up to date ({db.engine.url.render_as_string(hide_password=True)})")
    if advice := schema.unattended(db.engine):
        typer.echo(f"warning: {advice}", err=True)


@app.command()
def audit() -> None:
    """Check the CPT ledger: Σ balances + Σ escrow + Σ pending = Σ minted, every entry balanced."""
    from models import ledger, schema
    from models.db import Database

    settings = _settings()
    db = Database(settings.database_url)
    schema.upgrade(db.engine)
    with db.reading() as session:
        report = ledger.audit(session)
    typer.echo(
        f"minted {report.minted} = balances {report.balances} + escrow {report.escrow} + pending {report.pending}"
    )
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"PROBLEM: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("ledger balances")


@app.command()
def credit(
    username: str,
    value: int,
    reason: str = typer.Option(..., "--reason", help="Why (kept in the credit history)."),
) -> None:
    """Set a user's credit score (0–1000); their nodes' trust tiers follow at once."""
    from models import schema
    from models.db import Database
    from models.errors import PoolError
    from orchestration.credit import set_credit

    settings = _settings()
    db = Database(settings.database_url)
    schema.upgrade(db.engine)
    try:
        old, new = set_credit(db, settings, username, value, reason)
    except PoolError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"{username}: credit {old} → {new}")


def main() -> None:
    sys.exit(app())

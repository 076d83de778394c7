"""Entry point of the ``hivemind`` console script."""

from __future__ import annotations

from cli import account, tasks
from cli.app import app

COMMANDS = (account, tasks)  # importing them registers their commands on ``app``


def main() -> None:
    app()

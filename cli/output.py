"""How results are shown: rich text for people, one JSON document (or JSON lines) with ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "PENDING": "yellow",
    "ASSIGNED": "cyan",
    "RUNNING": "cyan",
    "STOPPING": "magenta",
    "STOPPED": "magenta",
    "COMPLETED": "green",
    "FAILED": "red",
    "idle": "green",
    "busy": "cyan",
    "offline": "red",
}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def short_time(iso: str) -> str:
    """``2025-01-02T03:04:05.678+00:00`` → ``2025-01-02 03:04:05`` (unchanged when it does not parse)."""
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


class Output:
    """Where a command's answer goes. In JSON mode the human methods print nothing."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        # No file given: rich looks sys.stdout up at each print, so captured output works too.
        self.console = Console(highlight=False, soft_wrap=True)
        self.stderr = Console(stderr=True, highlight=False)

    def data(self, payload: Any) -> None:
        """One JSON document (or one JSON line, when called repeatedly) on stdout, in JSON mode."""
        if self.json_mode:
            sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
            sys.stdout.flush()

    def say(self, *parts: str | Text) -> None:
        """A line for people (nothing in JSON mode). Plain strings are not parsed as markup."""
        if not self.json_mode:
            self.console.print(Text.assemble(*parts))

    def note(self, message: str) -> None:
        """A hint on stderr, shown in both modes (it never pollutes JSON on stdout)."""
        self.stderr.print(Text(message, style="dim"))

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[str | Text]], *, empty: str) -> None:
        if self.json_mode:
            return
        rows = list(rows)
        if not rows:
            self.say(empty)
            return
        table = Table(*columns, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

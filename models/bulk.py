"""Multi-row writes as plain Core statements, built once per table and column set.

``session.execute(update(Model), rows)`` and ``insert(Model)`` with a list of rows go through the
ORM's bulk persistence, which sorts and groups the rows and compiles per call; for the batches
that matching, dispatch and settlement write, that was a good part of their time. These helpers
send the same rows as one executemany of a statement reused from a cache.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Insert, Update, bindparam, insert, update
from sqlalchemy.orm import Session

from models.tables import Base, table_of


@functools.cache
def _update_by_pk(model: type[Base], columns: tuple[str, ...]) -> Update:
    table = table_of(model)
    # bind names must differ from the column names: a Core UPDATE keeps those for the SET clause
    return update(table).where(table.c.id == bindparam("b_id")).values({c: bindparam(f"b_{c}") for c in columns})


@functools.cache
def _insert(model: type[Base]) -> Insert:
    return insert(table_of(model))


def update_rows(session: Session, model: type[Base], rows: Iterable[dict[str, Any]]) -> None:
    """UPDATE each row of ``model`` by its ``id`` to the other values of its dict."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(c for c in row if c != "id")), []).append(row)
    if groups:
        session.flush()  # what the ORM's autoflush would have done first
    for columns, group in groups.items():
        session.execute(_update_by_pk(model, columns), [{f"b_{c}": v for c, v in row.items()} for row in group])


def insert_rows(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> None:
    """INSERT the rows (dicts of column values; column defaults apply to what they leave out)."""
    if rows:
        session.flush()
        session.execute(_insert(model), list(rows))

"""Statements a busy server runs for every call, executed on SQLite's own cursor.

SQLAlchemy spends some 20–30 µs of Python on each statement it executes (the session's
bookkeeping, the compiled-statement cache, the execution context, the result object), where
SQLite's cursor runs a short INSERT in about 4 µs; an upload on the embedded defaults ran seven
statements, most of its transaction's CPU (bench/notes.md). A :class:`Prepared` statement is
compiled by SQLAlchemy once (per set of parameter names) and then run on the driver's cursor,
with the same parameter processing SQLAlchemy applies (column defaults computed in Python, the
columns' bind processors, such as UtcDateTime's) and its rows processed as SQLAlchemy would
(Boolean from 0/1, …). Errors are raised as SQLAlchemy raises them (IntegrityError,
OperationalError, …), so the callers' handling and Database's retries are unchanged.

On any other database, and for any statement whose compiled form it cannot reproduce (values
rendered only at execution, defaults that are SQL expressions), it hands the statement to
SQLAlchemy as before.
"""

from __future__ import annotations

import collections
import functools
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, Executable

Params = Mapping[str, Any]
Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Plan:
    sql: str
    names: tuple[str, ...]  # bind names in their positional order
    binds: dict[str, Processor]  # bind name -> its bind processor
    fixed: dict[str, Any]  # values of binds the caller need not give: literals, scalar defaults
    computed: dict[str, Callable[[], Any]]  # Python-side column defaults, computed per row
    results: tuple[Processor, ...]  # per result column; empty when no column needs processing
    row_type: Any  # a namedtuple of the result columns' names (rows are read as row.name too)

    def args(self, params: Params) -> list[Any]:
        row: list[Any] = []
        for name in self.names:
            if name in params:
                value = params[name]
            elif name in self.computed:
                value = self.computed[name]()
            else:
                value = self.fixed[name]  # KeyError: a required parameter missing, as a programming error
            process = self.binds[name]
            row.append(value if process is None else process(value))
        return row

    def row(self, raw: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self.results:
            return self.row_type._make(raw)  # type: ignore[no-any-return]
        pairs = zip(raw, self.results, strict=True)
        values = (value if process is None else process(value) for value, process in pairs)
        return self.row_type._make(values)  # type: ignore[no-any-return]


class _Unsupported(Exception):
    """A statement whose compiled form this module does not reproduce; SQLAlchemy runs it."""


def _plan(statement: Executable, dialect: Dialect, keys: Sequence[str]) -> _Plan:
    compiled: Any = cast(ClauseElement, statement).compile(dialect=dialect, column_keys=list(keys))
    sql = compiled.string
    names = compiled.positiontup
    if "POSTCOMPILE" in sql or names is None or compiled.literal_execute_params:
        raise _Unsupported
    computed: dict[str, Callable[[], Any]] = {}
    fixed: dict[str, Any] = {}
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        default = column.default if column in compiled.insert_prefetch else column.onupdate
        if default is None:
            raise _Unsupported
        if default.is_scalar:
            fixed[column.key] = default.arg
        elif default.is_callable:
            computed[column.key] = functools.partial(default.arg, None)
        else:
            raise _Unsupported
    binds: dict[str, Processor] = {}
    for name, bind in compiled.binds.items():
        binds[name] = bind.type._cached_bind_processor(dialect)
        if name not in fixed and name not in computed and not bind.required:
            fixed[name] = bind.effective_value
    columns = getattr(compiled, "_result_columns", ())
    results = tuple(entry.type._cached_result_processor(dialect, None) for entry in columns)
    results = results if any(results) else ()
    try:
        row_type = collections.namedtuple("Row", [entry.keyname for entry in columns])  # type: ignore[misc]
    except ValueError:  # names a namedtuple cannot have (repeated, keywords, …): rows read by name would miss one
        raise _Unsupported from None
    return _Plan(sql, tuple(names), binds, fixed, computed, results, row_type)


class _Rows:
    """What the callers read of a result: the rows (processed), and the rows a write touched."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows, self.rowcount = rows, rowcount

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0][0]

    def all(self) -> list[tuple[Any, ...]]:
        return list(self._rows)


class Prepared:
    """A Core statement, built once at import like the rest; :meth:`execute` runs it."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, ...], _Plan | None] = {}
        self._lock = threading.Lock()

    def execute(self, on: Session | Connection, params: Params) -> Any:
        """Run the statement with ``params`` on ``on``'s connection, in its transaction; a result
        offering ``first``, ``scalar``, ``scalar_one``, ``all`` and ``rowcount``."""
        connection = on.connection() if isinstance(on, Session) else on
        plan = self._plan_for(connection.dialect, params)
        if plan is None:
            return connection.execute(self.statement, params)
        return self._run(connection, plan, params, lambda raw: raw.execute(plan.sql, plan.args(params)))

    def execute_many(self, on: Session | Connection, rows: Sequence[Params]) -> Any:
        """:meth:`execute` once for each of ``rows`` (each with the same names), as executemany;
        for statements that return no rows."""
        if not rows:
            return _Rows([], 0)
        connection = on.connection() if isinstance(on, Session) else on
        plan = self._plan_for(connection.dialect, rows[0])
        if plan is None:
            return connection.execute(self.statement, list(rows))
        return self._run(connection, plan, rows, lambda raw: raw.executemany(plan.sql, [plan.args(p) for p in rows]))

    @staticmethod
    def _run(
        connection: Connection, plan: _Plan, params: Params | Sequence[Params], run: Callable[[Any], Any]
    ) -> _Rows:
        raw = connection.connection.dbapi_connection
        try:
            cursor = run(raw)
            rows = [plan.row(row) for row in cursor.fetchall()] if cursor.description else []
            return _Rows(rows, cursor.rowcount)
        except sqlite3.Error as error:
            raise DBAPIError.instance(plan.sql, params, error, sqlite3.Error, dialect=connection.dialect) from error

    def _plan_for(self, dialect: Dialect, params: Params) -> _Plan | None:
        """How to run the statement on SQLite for parameters of these names; None elsewhere, and
        for a statement this module leaves to SQLAlchemy."""
        if dialect.name != "sqlite":
            return None
        keys = tuple(sorted(params))
        try:
            return self._plans[keys]
        except KeyError:
            pass
        with self._lock:
            if keys not in self._plans:
                try:
                    self._plans[keys] = _plan(self.statement, dialect, keys)
                except _Unsupported:
                    self._plans[keys] = None
            return self._plans[keys]

"""Batch settlement (orchestration.settlement) does exactly what finish_in does one task at a time.

Two mirror-image sets of tasks are built in one database — same owners' roles, nodes, prices,
metered minutes, outcomes — and one set is settled by ``finish_in`` task by task, the other by
``settlement.settle`` in one batch. Everything either leaves behind is compared after the names
are replaced by roles: task rows and their events, journal entries, balances, allocations,
node resources, credit and its history, and the ledger audit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from models import accounts, allocation, ledger, nodes, schema, tasks
from models.db import Database
from models.tables import (
    Account,
    Allocation,
    CreditEvent,
    JournalEntry,
    Node,
    Posting,
    Task,
    TaskEvent,
    User,
    utcnow,
)
from orchestration import economy, outcomes, settlement, uploads
from pool.settings import Settings

SETTINGS = Settings(_env_file=None, BCRYPT_ROUNDS=4)  # type: ignore[call-arg]
ZIP = b"PK\x05\x06" + b"\x00" * 18  # an empty zip; insert() only hashes it
# (name, outcome, RUNNING?, minutes metered before, minutes metered by an earlier accrual)
CASES = [
    ("done", "success", True, 3, 0),
    ("done-accrued", "success", True, 4, 2),
    ("done-assigned", "success", False, 0, 0),
    ("failed", "failure", True, 2, 1),
    ("failed-assigned", "failure", False, 0, 0),
    ("stale", "success", True, 1, 0),  # settled for another attempt: left alone
]


def build(db: Database, side: str) -> dict[tuple[str, int], tuple[str, int] | None]:
    """One set: a submitter, two node owners (one near the credit cap), a task per case."""
    submitter = accounts.register(
        db, username=f"sub{side}", password="password1", rounds=4, credit=50, initial_balance=10_000
    )
    owners = [
        accounts.register(db, username=f"own{side}{i}", password="password1", rounds=4, credit=c, initial_balance=0)
        for i, c in enumerate((50, 999))
    ]
    archived: dict[tuple[str, int], tuple[str, int] | None] = {}

    def work(session: sa.orm.Session) -> None:
        node_pks = []
        for i, owner in enumerate(owners):
            spec = nodes.NodeSpec(
                node_id=f"own{side}{i}",
                hostname="127.0.0.1",
                port=50000 + i,
                cpu_cores=8,
                cpu_score=1000,
                memory_gb=64,
                gpu_score=0,
                gpu_memory_gb=0,
                gpu_name="",
                location="",
                docker_status="enabled",
            )
            user = session.get(User, owner.id)
            assert user is not None
            node_pks.append(nodes.register(session, owner=user, spec=spec, tier="normal").record.pk)
        for n, (name, outcome, running, minutes, accrued) in enumerate(CASES):
            task_id = f"{name}-{side}"
            request = uploads.UploadRequest(
                task_id=task_id,
                task_zip=ZIP,
                needs={"cpu_score": 100, "memory_gb": 1, "gpu_score": 0, "gpu_memory_gb": 0},
                gpu_name="",
                location="",
                user_id=submitter.username,
                max_minutes=30,
            )
            uploads.insert(session, request, submitter.username, SETTINGS)
            view = tasks.get(session, task_id)
            assert view is not None
            node_pk = node_pks[n % 2]
            node_id = f"own{side}{n % 2}"
            assert allocation.allocate(
                session, node_pk=node_pk, task_id=task_id, attempt=1, need=allocation.Need(**view.needs)
            )
            assert tasks.transition(
                session, view, to=tasks.ASSIGNED, expected={tasks.PENDING}, reason="matched", attempt=1,
                node_pk=node_pk, node_id=node_id,
            )  # fmt: skip
            view = tasks.get(session, task_id)
            assert view is not None
            if running:
                started = utcnow() - timedelta(minutes=minutes, seconds=1)
                assert tasks.transition(
                    session, view, to=tasks.RUNNING, expected={tasks.ASSIGNED}, reason="accepted", started_at=started
                )
                view = tasks.get(session, task_id)
                assert view is not None
                if accrued:
                    economy.accrue(session, view, started + timedelta(minutes=accrued, seconds=1))
            tasks.set_fields(session, view.pk, reported_outcome=outcome, message=f"said {name}")
            archived[(task_id, 2 if name == "stale" else 1)] = ("ab" * 32, 123) if outcome == "success" else None

    db.transaction(work)
    return archived


def snapshot(db: Database, side: str) -> dict[str, object]:
    """Everything settlement touches for one side, names replaced by roles."""

    def role(text: str) -> str:
        return re.sub(rf"(?<=[a-z])-?{side}(\d?)\b", r"\1", text)

    with db.reading() as s:
        users = {
            u.id: role(u.username)
            for u in s.scalars(sa.select(User).where(User.username.in_([f"sub{side}", f"own{side}0", f"own{side}1"])))
        }
        task_rows = s.scalars(sa.select(Task).where(Task.task_id.like(f"%-{side}")).order_by(Task.task_id)).all()
        pks = {t.id: role(t.task_id) for t in task_rows}
        keys = {}
        for a in s.scalars(sa.select(Account).where(Account.kind != "mint")):
            parts = a.key.split(":")
            if a.kind == "balance" and int(parts[1]) in users:
                keys[a.id] = f"balance:{users[int(parts[1])]}"
            elif a.kind in ("escrow", "pending") and int(parts[2]) in pks:
                keys[a.id] = ":".join([a.kind, pks[int(parts[2])], *parts[3:]])
        balances = {keys[a.id]: a.balance for a in s.scalars(sa.select(Account).where(Account.id.in_(keys)))}
        entries = sorted(
            (e.kind, role(e.memo), p.amount, keys[p.account_id])
            for e, p in s.execute(
                sa.select(JournalEntry, Posting)
                .join(Posting, Posting.entry_id == JournalEntry.id)
                .where(Posting.account_id.in_(keys))
            )
        )
        return {
            "tasks": sorted(
                (role(t.task_id), t.status, t.message, t.result_sha256, t.result_size, t.finished_at is None)
                for t in task_rows
            ),
            "events": sorted(
                (pks[e.task_pk], e.from_status, e.to_status, e.attempt, role(e.node_id), role(e.reason))
                for e in s.scalars(sa.select(TaskEvent).where(TaskEvent.task_pk.in_(pks)))
            ),
            "balances": balances,
            "entries": entries,
            "allocations": sorted(
                (role(a.task_id), a.released_at is None, a.release_reason)
                for a in s.scalars(sa.select(Allocation).where(Allocation.task_id.like(f"%-{side}")))
            ),
            "nodes": sorted(
                (role(n.node_id), n.avail_cpu_score, n.avail_memory_gb, n.running_tasks, n.tier)
                for n in s.scalars(sa.select(Node).where(Node.node_id.like(f"own{side}_")))
            ),
            "credit": sorted(
                (users[u.id], u.credit_score) for u in s.scalars(sa.select(User).where(User.id.in_(users)))
            ),
            "credit_events": sorted(
                (users[c.user_id], c.change, c.credit_after, role(c.reason))
                for c in s.scalars(sa.select(CreditEvent).where(CreditEvent.user_id.in_(users)))
            ),
        }


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    schema.upgrade(database.engine)
    yield database
    database.dispose()


def test_batch_settlement_matches_one_task_at_a_time(db: Database) -> None:
    one_by_one, batch = build(db, "a"), build(db, "b")

    each = outcomes._finish_each(db, SETTINGS, one_by_one)
    statuses, left = db.transaction(lambda session: settlement.settle(session, SETTINGS, batch))

    assert left == []  # nothing fell back to finish_in
    assert {k[0][:-2]: v for k, v in statuses.items()} == {k[0][:-2]: v for k, v in each.items()}
    assert {k[0][:-2]: v for k, v in statuses.items()} == {
        "done": "COMPLETED",
        "done-accrued": "COMPLETED",
        "done-assigned": "COMPLETED",
        "failed": "FAILED",
        "failed-assigned": "FAILED",
        "stale": "RUNNING",
    }
    batched, single = snapshot(db, "b"), snapshot(db, "a")
    assert batched == single
    assert len(batched["entries"]) > 10 and len(batched["credit_events"]) == 3  # type: ignore[arg-type]
    with db.reading() as session:
        report = ledger.audit(session)
        assert report.ok, report.problems
        assert allocation.invariant_violations(session) == []


def test_settling_twice_pays_once(db: Database) -> None:
    batch = build(db, "c")
    first, _ = db.transaction(lambda session: settlement.settle(session, SETTINGS, batch))
    before = snapshot(db, "c")
    again, left = db.transaction(lambda session: settlement.settle(session, SETTINGS, batch))
    assert left == [] and again == first
    assert snapshot(db, "c") == before


def test_batch_accrual_matches_one_task_at_a_time(db: Database) -> None:
    one_by_one, batch = build(db, "x"), build(db, "y")
    now = utcnow() + timedelta(minutes=5)  # every running task has earned something since its last accrual

    def each(session: sa.orm.Session) -> int:
        return sum(
            economy.accrue(session, view, now)
            for view in tasks.get_many(session, [task_id for task_id, _ in one_by_one])
            if view.status == tasks.RUNNING
        )

    moved_each = db.transaction(each)
    moved_batch = db.transaction(lambda session: settlement.accrue_many(session, [t for t, _ in batch], now))

    assert moved_batch == moved_each > 0
    assert snapshot(db, "y") == snapshot(db, "x")
    assert db.transaction(lambda session: settlement.accrue_many(session, [t for t, _ in batch], now)) == 0
    with db.reading() as session:
        assert {v.accrued_until for v in tasks.get_many(session, [t for t, _ in batch]) if v.started_at} == {now}
        report = ledger.audit(session)
        assert report.ok, report.problems


@pytest.mark.postgres
def test_a_batch_leaves_its_submitters_balance_free_while_it_writes_its_postings(postgres_url: str) -> None:
    """A submitter's balance row is what every upload of theirs takes (PostgreSQL locks it from
    the upload's debit to its commit). A batch only credits it, near its end, so while
    the batch writes its postings another transaction can still take that row at once."""
    db = Database(postgres_url)
    schema.upgrade(db.engine)
    batch = build(db, "d")
    with db.reading() as session:
        submitter = session.scalars(sa.select(User.id).where(User.username == "subd")).one()
    balance = ledger.balance_key(submitter)
    other = sa.create_engine(postgres_url)
    taken_at_once: list[bool] = []

    def upload_meanwhile(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if not statement.startswith("INSERT INTO postings") or taken_at_once:
            return
        with other.connect() as conn:
            conn.execute(sa.text("SET lock_timeout = '1s'"))
            try:
                conn.execute(
                    sa.text("UPDATE accounts SET balance = balance - 1 WHERE key = :key RETURNING id"), {"key": balance}
                ).one()
                conn.commit()
                taken_at_once.append(True)
            except sa.exc.OperationalError:  # lock_not_available: the batch held the row
                taken_at_once.append(False)

    sa.event.listen(db.engine, "before_cursor_execute", upload_meanwhile)
    try:
        statuses, left = db.transaction(lambda session: settlement.settle(session, SETTINGS, batch))
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", upload_meanwhile)
        other.dispose()
    assert taken_at_once == [True]
    assert left == [] and statuses[("done-d", 1)] == "COMPLETED"
    with db.reading() as session:
        held, posted = session.execute(
            sa.select(Account.balance, sa.func.sum(Posting.amount))
            .join(Posting, Posting.account_id == Account.id)
            .where(Account.key == balance)
            .group_by(Account.balance)
        ).one()
    assert held == posted - 1  # the batch's refunds added to the row as it stood: the debit made meanwhile stays
    db.dispose()

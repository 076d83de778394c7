"""Settle a batch of reported outcomes with a fixed number of statements, whatever the batch size.

:func:`orchestration.outcomes.finish_in` settles one task at a time: some thirty statements
(transition, accrual, allocation release, reward, credit, refund). Here the batch's task rows,
ledger accounts, allocations and credits are read and locked once, every movement is worked
out in Python from those locked balances, and the writes go out as a handful of multi-row
statements. The journal is the same as finish_in's, entry for entry and memo for memo, so
``hivemind-pool audit`` and the credit history cannot tell the two apart.

Locks are taken in this order, each set in id order: task rows, their escrow and pending
accounts, allocations, nodes, the users' balances, users (as :func:`finish_in` takes a node
owner's balance, then the owner's credit). A batch only credits those balances (refunds to
submitters, rewards to node owners), so it never reads or locks them first: one relative update
each, near the end (:func:`ledger.credit_many`), followed only by the credit scores. A
submitter's balance row is the one that every upload of theirs takes, and a batch that locked
it from the start held those uploads for all its statements. A task that does not fit the
common case (a ledger account missing, say) is left out and returned for :func:`finish_in` to
handle alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from models import bulk, ledger, tasks
from models.tables import (
    RESOURCE_DIMENSIONS,
    Account,
    Allocation,
    JournalEntry,
    Node,
    Posting,
    Task,
    TaskEvent,
    table_of,
    utcnow,
)
from orchestration.credit import credit_completions
from orchestration.economy import escrow_key, pending_key
from orchestration.policies.pricing import owed
from pool.settings import Settings

Key = tuple[str, int]  # (task_id, attempt)


@dataclass
class _Books:
    """The accounts of a batch and the movements worked out on them. ``balances`` holds what the
    locked accounts hold; for the ``credited`` ones (users' balances, not read), what the batch
    adds to them."""

    ids: dict[str, int]
    balances: dict[str, int]
    credited: set[str] = field(default_factory=set)
    entries: list[tuple[str, str, str, int, str]] = field(default_factory=list)  # kind, debit, credit, amount, memo
    created: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # key → (kind, user id)

    def move(self, kind: str, source: str, target: str, amount: int, memo: str) -> None:
        if amount <= 0:
            return
        if source in self.credited:
            raise ValueError(f"{source} is only credited here: its balance was not read")
        self.balances[source] -= amount
        self.balances[target] = self.balances.get(target, 0) + amount
        self.entries.append((kind, source, target, amount, memo))

    def drain(self, source: str, target: str, kind: str, memo: str) -> None:
        self.move(kind, source, target, self.balances.get(source, 0), memo)


def settle(
    session: Session, settings: Settings, archived: dict[Key, tuple[str, int] | None]
) -> tuple[dict[Key, str], list[Key]]:
    """In the caller's transaction: COMPLETED or FAILED for every reported attempt of ``archived``
    (the same effects as :func:`finish_in` for each). Returns the statuses afterwards, and the
    attempts left for finish_in (none in the common case)."""
    views = _locked_views(session, [task_id for task_id, _ in archived])
    statuses: dict[Key, str] = {}
    due: list[tuple[tasks.TaskView, tuple[str, int] | None]] = []
    for (task_id, attempt), result in archived.items():
        view = views.get(task_id)
        if view is None or view.attempt != attempt or view.status not in tasks.ACTIVE or not view.reported_outcome:
            statuses[(task_id, attempt)] = view.status if view else ""
        else:
            due.append((view, result))
    if not due:
        return statuses, []

    books = _lock_accounts(session, [view for view, _ in due])
    left: list[Key] = []
    now = utcnow()
    task_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    reasons: dict[str, str] = {}
    credits: dict[int, list[str]] = defaultdict(list)
    for view, result in due:
        key = (view.task_id, view.attempt)
        owner_balance = ledger.balance_key(view.owner_id)
        node_balance = ledger.balance_key(view.node_owner_id) if view.node_owner_id is not None else ""
        if (
            escrow_key(view.pk) not in books.ids
            or owner_balance not in books.ids
            or (node_balance and node_balance not in books.ids)
        ):
            left.append(key)  # finish_in says what is wrong with it
            continue
        success = view.reported_outcome == "success"
        to = tasks.COMPLETED if success else tasks.FAILED
        message = "completed" if success else (view.message or "the task reported failure")
        accrued_until = _accrue(books, view, now)
        pending = pending_key(view.pk, view.attempt)
        if success and view.node_owner_id is not None:
            books.drain(pending, node_balance, "reward", f"reward for task {view.task_id}")
            credits[view.node_owner_id].append(view.task_id)
        else:
            books.drain(
                pending, escrow_key(view.pk), "refund", f"refund of attempt {view.attempt} of task {view.task_id}"
            )
        books.drain(escrow_key(view.pk), owner_balance, "refund", f"unused escrow of task {view.task_id}")
        digest, size = result or ("", 0)
        task_rows.append(
            {
                "id": view.pk,
                "status": to,
                "updated_at": now,
                "finished_at": now,
                "result_sha256": digest,
                "result_size": size,
                "message": message,
                "accrued_until": accrued_until,
            }
        )
        event_rows.append(
            {
                "task_pk": view.pk,
                "at": now,
                "from_status": view.status,
                "to_status": to,
                "attempt": view.attempt,
                "node_id": view.node_id,
                "reason": message[:300],
            }
        )
        statuses[key] = to
        reasons[view.task_id] = to.lower()

    if task_rows:
        bulk.update_rows(session, Task, task_rows)
        bulk.insert_rows(session, TaskEvent, event_rows)
        _write_books(session, books)
        _release(session, reasons, now)
        ledger.credit_many(session, {books.ids[key]: books.balances.get(key, 0) for key in books.credited})
        credit_completions(session, settings, credits, now)
    return statuses, left


def accrue_many(session: Session, task_ids: list[str], now: datetime) -> int:
    """In the caller's transaction: :func:`economy.accrue` for every RUNNING task of ``task_ids``,
    with a fixed number of statements. The CPT moved from escrow to pending rewards."""
    views = _locked_views(session, task_ids)
    running = [view for view in views.values() if view.status == tasks.RUNNING]
    books = _lock_accounts(session, running, balances=False)
    metered = []
    for view in running:
        if escrow_key(view.pk) in books.ids and _accrue(books, view, now) == now:
            metered.append({"id": view.pk, "accrued_until": now})
    _write_books(session, books)
    if metered:
        bulk.update_rows(session, Task, metered)
    return sum(amount for _, _, _, amount, _ in books.entries)


def _locked_views(session: Session, task_ids: list[str]) -> dict[str, tasks.TaskView]:
    """The tasks named, their rows locked (in id order) before they are read."""
    session.execute(select(Task.id).where(Task.task_id.in_(task_ids)).order_by(Task.id).with_for_update()).all()
    return {view.task_id: view for view in tasks.get_many(session, task_ids)}


def _lock_accounts(session: Session, due: list[tasks.TaskView], *, balances: bool = True) -> _Books:
    """The escrow and pending accounts of ``due``, locked in id order, and (``balances``) the ids
    of its users' balances, to be credited (not read, not locked)."""
    keys: set[str] = set()
    users: set[str] = set()
    for view in due:
        keys |= {escrow_key(view.pk), pending_key(view.pk, view.attempt)}
        if balances:
            users.add(ledger.balance_key(view.owner_id))
        if balances and view.node_owner_id is not None:
            users.add(ledger.balance_key(view.node_owner_id))
    rows = session.execute(
        select(Account.key, Account.id, Account.balance)
        .where(Account.key.in_(keys))
        .order_by(Account.id)
        .with_for_update()
    ).all()
    books = _Books(ids={key: pk for key, pk, _ in rows}, balances={key: balance for key, _, balance in rows})
    if users:
        found = dict(session.execute(select(Account.key, Account.id).where(Account.key.in_(users))).all())
        books.ids.update(found)
        books.credited = set(found)
    return books


def _accrue(books: _Books, view: tasks.TaskView, now: datetime) -> datetime | None:
    """economy.accrue on the books: escrow → pending for the metered time. The task's accrued_until."""
    if view.status != tasks.RUNNING or view.started_at is None or view.attempt <= 0:
        return view.accrued_until
    pending = pending_key(view.pk, view.attempt)
    target = owed(view.price_per_minute, (now - view.started_at).total_seconds())
    delta = min(target - books.balances.get(pending, 0), books.balances[escrow_key(view.pk)])
    if delta <= 0:
        return view.accrued_until
    if pending not in books.ids:
        books.created[pending] = ("pending", view.node_owner_id)
        books.ids[pending] = 0  # its id is known once inserted
    books.move(
        "accrual",
        escrow_key(view.pk),
        pending,
        delta,
        f"metered work on task {view.task_id} attempt {view.attempt}",
    )
    return now


_accounts, _entries = table_of(Account), table_of(JournalEntry)
_NEW_ACCOUNTS = insert(_accounts).returning(_accounts.c.key, _accounts.c.id, sort_by_parameter_order=True)
_NEW_ENTRIES = insert(_entries).returning(_entries.c.id, sort_by_parameter_order=True)


def _write_books(session: Session, books: _Books) -> None:
    if books.created:
        keys = list(books.created)
        inserted = session.execute(
            _NEW_ACCOUNTS,
            [{"key": k, "kind": books.created[k][0], "user_id": books.created[k][1], "balance": 0} for k in keys],
        ).all()
        books.ids.update(dict(inserted))
    if not books.entries:
        return
    entry_ids = session.scalars(
        _NEW_ENTRIES,
        [{"kind": kind, "memo": memo[:200]} for kind, _, _, _, memo in books.entries],
    ).all()
    postings = []
    touched: set[str] = set()
    for entry_id, (_, debit, credit, amount, _) in zip(entry_ids, books.entries, strict=True):
        postings += [
            {"entry_id": entry_id, "account_id": books.ids[debit], "amount": -amount},
            {"entry_id": entry_id, "account_id": books.ids[credit], "amount": amount},
        ]
        touched |= {debit, credit}
    bulk.insert_rows(session, Posting, postings)
    locked = sorted(touched - books.credited)
    bulk.update_rows(session, Account, [{"id": books.ids[k], "balance": books.balances[k]} for k in locked])


def _release(session: Session, reason_of: dict[str, str], now: datetime) -> None:
    """allocation.release_task for every settled task: flip each active allocation, give the nodes back."""
    held = session.scalars(
        select(Allocation)
        .where(Allocation.task_id.in_(list(reason_of)), Allocation.released_at.is_(None))
        .order_by(Allocation.id)
        .with_for_update()
    ).all()
    if not held:
        return
    bulk.update_rows(
        session,
        Allocation,
        [{"id": a.id, "released_at": now, "release_reason": reason_of[a.task_id][:64]} for a in held],
    )
    back: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*RESOURCE_DIMENSIONS, "tasks"), 0))
    for a in held:
        for d in RESOURCE_DIMENSIONS:
            back[a.node_pk][d] += getattr(a, d)
        back[a.node_pk]["tasks"] += 1
    table = table_of(Node)
    give_back = (
        update(table)
        .where(table.c.id == bindparam("b_node"))
        .values(
            **{f"avail_{d}": table.c[f"avail_{d}"] + bindparam(f"b_{d}") for d in RESOURCE_DIMENSIONS},
            running_tasks=table.c.running_tasks - bindparam("b_tasks"),
            changed_at=now,
        )
    )
    session.execute(
        give_back,
        [{"b_node": pk, **{f"b_{d}": n for d, n in amounts.items()}} for pk, amounts in sorted(back.items())],
    )

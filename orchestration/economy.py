"""CPT around a task: escrow at upload, server-metered accrual, settlement, credit (SPEC §4, §7).

The pool meters allocated resources × wall time itself; nothing a node reports changes what it
earns. Every function runs inside the caller's transaction, with the task row locked by the
guarded transition (or by ``lock``), so running any of them twice pays once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from models import ledger
from models.errors import InsufficientBalance
from models.tables import Account, CreditEvent, Task, User
from models.tasks import TaskView
from orchestration.policies.pricing import owed

ESCROW_PREFIX = "escrow:task:"


def escrow_key(task_pk: int) -> str:
    return f"{ESCROW_PREFIX}{task_pk}"


def pending_key(task_pk: int, attempt: int) -> str:
    return f"pending:task:{task_pk}:{attempt}"


def _balance(session: Session, key: str) -> int:
    return int(session.scalar(select(Account.balance).where(Account.key == key)) or 0)


def escrow(session: Session, *, task_pk: int, task_id: str, owner_id: int, amount: int) -> None:
    """Move ``amount`` from the owner's balance into the task's escrow; InsufficientBalance if short."""
    if amount <= 0:
        ledger.open_account(session, escrow_key(task_pk), "escrow", owner_id)  # the task is new
        return
    try:
        ledger.fund_new_account(
            session,
            payer_key=ledger.balance_key(owner_id),
            key=escrow_key(task_pk),
            kind="escrow",
            user_id=owner_id,
            amount=amount,
            entry_kind="escrow",
            memo=escrow_memo(task_id),
        )
    except InsufficientBalance as error:
        raise short_of(session, owner_id, amount) from error


def escrow_memo(task_id: str) -> str:
    return f"escrow for task {task_id}"


def short_of(session: Session, owner_id: int, amount: int) -> InsufficientBalance:
    """The refusal of an escrow of ``amount`` that the owner's balance does not cover."""
    have = _balance(session, ledger.balance_key(owner_id))
    return InsufficientBalance(f"insufficient balance: this task may cost up to {amount} CPT and you have {have} CPT")


def accrue(session: Session, task: TaskView, now: datetime) -> int:
    """Move what the current attempt has earned up to ``now`` from escrow to its pending reward.

    The target is a function of wall time since the attempt started, so a second run for the
    same instant moves nothing. Returns the CPT moved.
    """
    if task.started_at is None or task.attempt <= 0:
        return 0
    session.execute(select(Task.id).where(Task.id == task.pk).with_for_update())  # one accrual at a time
    target = owed(task.price_per_minute, (now - task.started_at).total_seconds())
    pending = ledger.get_or_create_account(session, pending_key(task.pk, task.attempt), "pending", task.node_owner_id)
    delta = min(target - _balance(session, pending.key), _balance(session, escrow_key(task.pk)))
    if delta <= 0:
        return 0
    ledger.post(
        session,
        kind="accrual",
        debit=ledger.account_id(session, escrow_key(task.pk)),
        credit=pending.id,
        amount=delta,
        memo=f"metered work on task {task.task_id} attempt {task.attempt}",
    )
    session.execute(update(Task).where(Task.id == task.pk).values(accrued_until=now))
    return delta


def accrued(session: Session, task_pk: int, attempt: int) -> int:
    return _balance(session, pending_key(task_pk, attempt))


def pay_node(session: Session, task: TaskView, attempt: int, node_owner_id: int) -> int:
    """Pay the attempt's pending reward to the node's owner."""
    return _drain(
        session,
        pending_key(task.pk, attempt),
        ledger.balance_key(node_owner_id),
        "reward",
        f"reward for task {task.task_id}",
    )


def refund_pending(session: Session, task: TaskView, attempt: int) -> int:
    """A node-caused failure: the attempt's pending reward goes back into escrow."""
    return _drain(
        session,
        pending_key(task.pk, attempt),
        escrow_key(task.pk),
        "refund",
        f"refund of attempt {attempt} of task {task.task_id}",
    )


def refund_escrow(session: Session, task: TaskView) -> int:
    """The task is over: what is left in escrow returns to the submitter."""
    return _drain(
        session,
        escrow_key(task.pk),
        ledger.balance_key(task.owner_id),
        "refund",
        f"unused escrow of task {task.task_id}",
    )


def _drain(session: Session, source: str, target: str, kind: str, memo: str) -> int:
    amount = _balance(session, source)
    if amount <= 0:
        return 0
    target_account = session.scalar(select(Account).where(Account.key == target))
    if target_account is None:
        raise LookupError(f"no ledger account {target!r}")
    ledger.post(
        session, kind=kind, debit=ledger.account_id(session, source), credit=target_account.id, amount=amount, memo=memo
    )
    return amount


def change_credit(session: Session, user_id: int, change: int, reason: str) -> int:
    """Add ``change`` to a user's credit, clamped to [0, 1000], in one UPDATE; recorded. The new credit."""
    raised = User.credit_score + change
    session.execute(
        update(User)
        .where(User.id == user_id)
        .values(credit_score=case((raised > 1000, 1000), (raised < 0, 0), else_=raised))
    )
    after = int(session.scalar(select(User.credit_score).where(User.id == user_id)) or 0)
    session.add(CreditEvent(user_id=user_id, change=change, credit_after=after, reason=reason[:300]))
    return after

"""SQLAlchemy mapped classes: the system of record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def table_of(model: type[Base]) -> Table:
    """A mapped class's Core table, for statements built once and reused (no ORM layers per call)."""
    return cast(Table, model.__table__)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("credit_score >= 0 AND credit_score <= 1000", name="credit_range"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(32), nullable=False)
    password_hash: Mapped[str] = mapped_column(String(100), nullable=False)
    credit_score: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


# "Alice" and "alice" are one account: no look-alike impersonation.
Index("uq_users_username_lower", func.lower(User.username), unique=True)


class Account(Base):
    """A ledger account. ``key`` names it: ``mint``, ``balance:<user id>``, ``escrow:<task>``…

    Only the mint may go negative: its balance is minus everything ever created.
    """

    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint("kind = 'mint' OR balance >= 0", name="non_negative"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(120), nullable=False, unique=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class JournalEntry(Base):
    """One movement of CPT: a set of postings that sum to zero."""

    __tablename__ = "journal_entries"
    __table_args__ = (UniqueConstraint("initiator_id", "idempotency_key", name="uq_entry_idempotency"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    initiator_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    memo: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Posting(Base):
    __tablename__ = "postings"
    __table_args__ = (CheckConstraint("amount <> 0", name="non_zero"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("journal_entries.id"), nullable=False, index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), nullable=False, index=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)


RESOURCE_DIMENSIONS = ("cpu_score", "memory_gb", "gpu_score", "gpu_memory_gb")


class Node(Base):
    """A worker machine. ``cap_*`` is what it has, ``avail_*`` what is not allocated.

    Invariant (kept by models.allocation): ``0 ≤ avail ≤ cap`` and
    ``avail + Σ active allocations = cap`` in every dimension.
    """

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint(
            " AND ".join(f"avail_{d} >= 0 AND avail_{d} <= cap_{d}" for d in RESOURCE_DIMENSIONS),
            name="avail_within_capacity",
        ),
        CheckConstraint("running_tasks >= 0", name="running_non_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(80), nullable=False, unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    hostname: Mapped[str] = mapped_column(String(253), nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    cpu_cores: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    gpu_name: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    location: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    docker_status: Mapped[str] = mapped_column(String(16), nullable=False)  # normalised: enabled|disabled
    tier: Mapped[str] = mapped_column(String(8), nullable=False)  # high|normal|low
    status: Mapped[str] = mapped_column(String(8), nullable=False)  # online|offline
    max_tasks: Mapped[int | None] = mapped_column(Integer)
    running_tasks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cap_cpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    cap_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    cap_gpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    cap_gpu_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    avail_cpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    avail_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    avail_gpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    avail_gpu_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # Bumped on every change, so a scheduler can refresh only what changed since its last look.
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)


class Allocation(Base):
    """Resources of one node held by one attempt of one task until released (exactly once)."""

    __tablename__ = "allocations"
    __table_args__ = (
        UniqueConstraint("task_id", "attempt", name="uq_allocation_task_attempt"),
        Index("ix_allocations_active_node", "node_pk", "released_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_pk: Mapped[int] = mapped_column(ForeignKey("nodes.id"), nullable=False)
    task_id: Mapped[str] = mapped_column(String(64), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    cpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    release_reason: Mapped[str] = mapped_column(String(64), nullable=False, default="")


class Task(Base):
    """A submitted task. ``attempt`` counts dispatches; reports must name the current one."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_status_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(12), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    node_pk: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"))
    cpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu_score: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu_memory_gb: Mapped[int] = mapped_column(Integer, nullable=False)
    gpu_name: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    location: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    max_minutes: Mapped[int] = mapped_column(Integer, nullable=False)
    zip_digest: Mapped[str] = mapped_column(String(80), nullable=False)  # digests.zip_digest: "<algorithm>:<hex>"
    zip_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    excluded_nodes: Mapped[str] = mapped_column(String(2000), nullable=False, default="")  # space-separated
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    pending_reason: Mapped[str] = mapped_column(String(300), nullable=False, default="")
    message: Mapped[str] = mapped_column(String(500), nullable=False, default="")  # why it ended as it did
    reported_outcome: Mapped[str] = mapped_column(String(8), nullable=False, default="")  # success|failure
    output_lines: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    output_truncated: Mapped[bool] = mapped_column(default=False)
    result_sha256: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    result_size: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    result_pruned: Mapped[bool] = mapped_column(default=False)
    price_per_minute: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    accrued_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TaskEvent(Base):
    """One state transition of a task: history that survives restarts."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    from_status: Mapped[str] = mapped_column(String(12), nullable=False)
    to_status: Mapped[str] = mapped_column(String(12), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    node_id: Mapped[str] = mapped_column(String(80), nullable=False, default="")
    reason: Mapped[str] = mapped_column(String(300), nullable=False, default="")


class TaskFile(Base):
    """A task's small file kept in the database instead of its folder (``INLINE_ZIP_BYTES``):
    ``task.zip`` while the task lives, ``result.zip`` until retention prunes it."""

    __tablename__ = "task_files"

    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", name="fk_task_files_task_pk_tasks"), primary_key=True)
    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class TaskOutput(Base):
    __tablename__ = "task_output"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"), nullable=False, index=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    line: Mapped[str] = mapped_column(String(4000), nullable=False)


class TaskLog(Base):
    __tablename__ = "task_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"), nullable=False, index=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    ts: Mapped[float] = mapped_column(nullable=False)
    level: Mapped[str] = mapped_column(String(16), nullable=False)
    message: Mapped[str] = mapped_column(String(4000), nullable=False)


class CreditEvent(Base):
    """Every change of a user's credit score, with why and by whom."""

    __tablename__ = "credit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    change: Mapped[int] = mapped_column(Integer, nullable=False)
    credit_after: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(String(300), nullable=False)

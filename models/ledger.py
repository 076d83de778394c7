"""The double-entry CPT ledger.

Every movement is a :class:`JournalEntry` whose postings sum to zero. Balances are kept on the
accounts and changed only by conditional updates in the same transaction as the postings, so
``Σ non-mint balances = −mint balance = Σ minted`` holds at every commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import BigInteger, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from models.errors import InsufficientBalance
from models.prepared import Prepared
from models.tables import Account, JournalEntry, Posting, UtcDateTime, table_of, utcnow

MINT_KEY = "mint"


def balance_key(user_id: int) -> str:
    return f"balance:{user_id}"


# Statements built once and reused (a reused statement keeps its cache key), on the tables rather
# than the ORM classes: these run for every task, and plain Core statements skip the ORM's layers.
_accounts = table_of(Account)
_ACCOUNT_BY_KEY = select(Account).where(Account.key == bindparam("key"))
_ACCOUNT_ID_BY_KEY = select(_accounts.c.id).where(_accounts.c.key == bindparam("key"))
_CREDIT = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("account"))
    .values(balance=_accounts.c.balance + bindparam("amount"))
)
_DEBIT = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("account"))
    .values(balance=_accounts.c.balance - bindparam("amount"))
)
_DEBIT_COVERED = _DEBIT.where(_accounts.c.balance >= bindparam("amount"))
_NEW_ACCOUNT = Prepared(insert(_accounts).returning(_accounts.c.id))
_NEW_ENTRY = Prepared(insert(table_of(JournalEntry)).returning(table_of(JournalEntry).c.id))
_NEW_POSTINGS = Prepared(insert(table_of(Posting)))


def get_or_create_account(session: Session, key: str, kind: str, user_id: int | None = None) -> Account:
    account = session.scalar(_ACCOUNT_BY_KEY, {"key": key})
    if account is None:
        account = Account(key=key, kind=kind, user_id=user_id, balance=0)
        session.add(account)
        session.flush()
    return account


def open_account(session: Session, key: str, kind: str, user_id: int | None = None) -> int:
    """Create an account that cannot exist yet (a new task's escrow); its id."""
    return int(_NEW_ACCOUNT.execute(session, {"key": key, "kind": kind, "user_id": user_id, "balance": 0}).scalar_one())


_DEBIT_COVERED_BY_KEY = Prepared(
    update(_accounts)
    .where(_accounts.c.key == bindparam("b_key"), _accounts.c.balance >= bindparam("b_amount"))
    .values(balance=_accounts.c.balance - bindparam("b_amount"))
    .returning(_accounts.c.id)
)


def fund_new_account(
    session: Session,
    *,
    payer_key: str,
    key: str,
    kind: str,
    user_id: int | None,
    amount: int,
    entry_kind: str,
    memo: str,
) -> int:
    """Open the account ``key`` (it cannot exist yet) holding ``amount`` taken from ``payer_key``,
    as one journal entry, in four statements; the new account's id.

    The same entry and postings as ``open_account`` then ``post``; the new account is this
    transaction's own, so only the payer's row is locked. Raises :class:`InsufficientBalance`
    when the payer cannot cover ``amount`` (or has no account).
    """
    if amount <= 0:
        raise ValueError("amount must be positive")
    if session.get_bind().dialect.name == "postgresql":  # the same four writes, in one round trip
        found = session.execute(
            _FUND_NEW_ACCOUNT_PG,
            {
                "entry_kind": entry_kind,
                "memo": memo,
                "user_id": user_id,
                "now": utcnow(),
                "payer_key": payer_key,
                "amount": amount,
                "key": key,
                "kind": kind,
            },
        ).scalar()
        if found is None:
            raise InsufficientBalance(f"insufficient balance: {amount} CPT needed")
        return int(found)
    entry_id: int = _NEW_ENTRY.execute(
        session, {"kind": entry_kind, "memo": memo, "initiator_id": user_id}
    ).scalar_one()
    payer = _DEBIT_COVERED_BY_KEY.execute(session, {"b_key": payer_key, "b_amount": amount}).scalar()
    if payer is None:
        raise InsufficientBalance(f"insufficient balance: {amount} CPT needed")
    account = int(
        _NEW_ACCOUNT.execute(session, {"key": key, "kind": kind, "user_id": user_id, "balance": amount}).scalar_one()
    )
    _write_postings(session, entry_id, debit=payer, credit=account, amount=amount)
    return account


# PostgreSQL runs data-modifying CTEs: the covered debit (PAYER_PG), then the entry, the new
# account and both postings (funding_pg), all in one statement. No payer row (not covered) means
# nothing else is written either, and no row comes back, on which the caller raises.
PAYER_PG = """payer AS (
        UPDATE accounts SET balance = balance - :amount
        WHERE key = :payer_key AND balance >= :amount RETURNING id
    )"""


def funding_pg(key: str, sources: str = "payer") -> str:
    """The CTEs ``entry``, ``account``, ``debit`` and ``credit`` that follow PAYER_PG (PostgreSQL):
    the new account, whose key is the SQL expression ``key`` (over ``sources``, which include
    ``payer``), holding :amount as one journal entry. Parameters: :entry_kind, :user_id, :memo,
    :now, :kind, :amount. Each writes only when ``payer`` has its row."""
    return f"""entry AS (
        INSERT INTO journal_entries (kind, initiator_id, memo, created_at)
        SELECT CAST(:entry_kind AS VARCHAR), CAST(:user_id AS INTEGER), CAST(:memo AS VARCHAR), :now
        FROM payer RETURNING id
    ), account AS (
        INSERT INTO accounts (key, kind, user_id, balance)
        SELECT {key}, CAST(:kind AS VARCHAR), CAST(:user_id AS INTEGER), :amount FROM {sources} RETURNING id
    ), debit AS (
        INSERT INTO postings (entry_id, account_id, amount)
        SELECT entry.id, payer.id, -CAST(:amount AS BIGINT) FROM entry, payer RETURNING id
    ), credit AS (
        INSERT INTO postings (entry_id, account_id, amount)
        SELECT entry.id, account.id, :amount FROM entry, account RETURNING id
    )"""


_FUND_NEW_ACCOUNT_PG = text(
    f"WITH {PAYER_PG}, {funding_pg('CAST(:key AS VARCHAR)')} SELECT account.id FROM account, debit, credit"
).bindparams(bindparam("now", type_=UtcDateTime()), bindparam("amount", type_=BigInteger()))


def account_id(session: Session, key: str) -> int:
    found = session.scalar(_ACCOUNT_ID_BY_KEY, {"key": key})
    if found is None:
        raise LookupError(f"no ledger account {key!r}")
    return found


def _debit(session: Session, account: int, amount: int, *, allow_negative: bool = False) -> bool:
    """Conditional decrement: never read-modify-write. False if the balance would go negative."""
    stmt = _DEBIT if allow_negative else _DEBIT_COVERED
    return session.execute(stmt, {"account": account, "amount": amount}).rowcount == 1  # type: ignore[attr-defined]


def _credit(session: Session, account: int, amount: int) -> None:
    session.execute(_CREDIT, {"account": account, "amount": amount})


def credit_many(session: Session, amounts: Mapping[int, int]) -> None:
    """Add each amount to its account (by id), in id order. A relative update: the rows need not
    have been read or locked before, and each is locked only from here to the commit. The
    caller writes the postings that account for it in the same transaction."""
    rows = [{"account": account, "amount": amount} for account, amount in sorted(amounts.items()) if amount]
    if rows:
        session.execute(_CREDIT, rows)


def post(
    session: Session,
    *,
    kind: str,
    debit: int,
    credit: int,
    amount: int,
    memo: str = "",
    initiator_id: int | None = None,
    idempotency_key: str | None = None,
    allow_negative: bool = False,
) -> int:
    """Move ``amount`` from account ``debit`` to account ``credit`` as one journal entry; its id.

    Rows are updated in account-id order so two opposite movements cannot deadlock.
    Raises :class:`InsufficientBalance` when ``debit`` cannot cover ``amount``; the caller's
    transaction must then be rolled back (the entry row was already inserted).
    """
    if amount <= 0:
        raise ValueError("amount must be positive")
    entry = {"kind": kind, "initiator_id": initiator_id, "idempotency_key": idempotency_key, "memo": memo}
    entry_id: int = _NEW_ENTRY.execute(session, entry).scalar_one()  # a unique idempotency key is checked here
    for account, side in sorted([(debit, "debit"), (credit, "credit")]):
        if side == "credit":
            _credit(session, account, amount)
        elif not _debit(session, account, amount, allow_negative=allow_negative):
            raise InsufficientBalance(f"insufficient balance: {amount} CPT needed")
    _write_postings(session, entry_id, debit=debit, credit=credit, amount=amount)
    return entry_id


def _write_postings(session: Session, entry_id: int, *, debit: int, credit: int, amount: int) -> None:
    """The two postings of an entry: ``-amount`` on ``debit``, ``+amount`` on ``credit``."""
    _NEW_POSTINGS.execute_many(
        session,
        [
            {"entry_id": entry_id, "account_id": debit, "amount": -amount},
            {"entry_id": entry_id, "account_id": credit, "amount": amount},
        ],
    )


def mint(session: Session, *, to_account: int, amount: int, memo: str) -> int:
    """Create ``amount`` new CPT into ``to_account`` (the mint account goes further negative)."""
    mint_id = account_id(session, MINT_KEY)
    return post(session, kind="mint", debit=mint_id, credit=to_account, amount=amount, memo=memo, allow_negative=True)


def postings_of(session: Session, entry_id: int) -> list[Posting]:
    return list(session.scalars(select(Posting).where(Posting.entry_id == entry_id).order_by(Posting.amount)))


@dataclass(frozen=True)
class AuditReport:
    minted: int
    balances: int
    escrow: int
    pending: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(session: Session) -> AuditReport:
    """Check conservation and that every entry and account agrees with its postings."""
    problems: list[str] = []
    totals = dict(
        session.execute(select(Account.kind, func.coalesce(func.sum(Account.balance), 0)).group_by(Account.kind)).all()
    )
    minted = -int(totals.get("mint", 0))
    held = {kind: int(total) for kind, total in totals.items() if kind != "mint"}
    if sum(held.values()) != minted:
        problems.append(f"conservation broken: Σ accounts {sum(held.values())} ≠ Σ minted {minted}")
    unbalanced = session.execute(
        select(Posting.entry_id, func.sum(Posting.amount))
        .group_by(Posting.entry_id)
        .having(func.sum(Posting.amount) != 0)
        .limit(5)
    ).all()
    problems += [f"journal entry {entry} does not balance (Σ postings = {total})" for entry, total in unbalanced]
    posted = select(Posting.account_id, func.sum(Posting.amount).label("total")).group_by(Posting.account_id).subquery()
    drift = session.execute(
        select(Account.key, Account.balance, func.coalesce(posted.c.total, 0))
        .outerjoin(posted, posted.c.account_id == Account.id)
        .where(Account.balance != func.coalesce(posted.c.total, 0))
        .limit(5)
    ).all()
    problems += [f"account {key} holds {bal} but its postings sum to {total}" for key, bal, total in drift]
    negative = session.scalars(select(Account.key).where(Account.kind != "mint", Account.balance < 0).limit(5)).all()
    problems += [f"account {key} is negative" for key in negative]
    return AuditReport(
        minted=minted,
        balances=held.get("balance", 0),
        escrow=held.get("escrow", 0),
        pending=held.get("pending", 0),
        problems=tuple(problems),
    )

"""User accounts and the operations on them: register, verify a password, balance, transfer."""

from __future__ import annotations

import re
from dataclasses import dataclass

import bcrypt
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import ledger
from models.db import Database
from models.errors import InvalidArgument, NotFound, Refused
from models.tables import Account, JournalEntry, User, table_of

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")
IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MIN_PASSWORD = 8
MAX_PASSWORD = 72  # bcrypt looks at 72 bytes; longer would silently be truncated

# Checked against when the username does not exist, so both paths cost one bcrypt.
_DUMMY_HASH = bcrypt.hashpw(b"not-a-real-password", bcrypt.gensalt(4))


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    credit_score: int


def validate_username(username: str) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise InvalidArgument("username must be 3–32 characters of letters, digits, '_', '.' or '-'")
    return username


def validate_password(password: str) -> str:
    size = len(password.encode())
    if len(password) < MIN_PASSWORD:
        raise InvalidArgument(f"password must be at least {MIN_PASSWORD} characters")
    if size > MAX_PASSWORD:
        raise InvalidArgument(f"password must be at most {MAX_PASSWORD} bytes")
    if "\x00" in password:
        raise InvalidArgument("password must not contain NUL characters")
    return password


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def find_user(session: Session, username: str) -> User | None:
    if not USERNAME_RE.fullmatch(username):
        return None  # no user can have this name (and PostgreSQL refuses some strings, e.g. with NUL, outright)
    return session.scalar(_USER_BY_NAME, {"name": username.lower()})


def user_id(session: Session, username: str) -> int | None:
    """:func:`find_user`'s id only, without building the ORM object."""
    if not USERNAME_RE.fullmatch(username):
        return None
    found = session.execute(_USER_ID_BY_NAME, {"name": username.lower()}).scalar()
    return int(found) if found is not None else None


# built once, reused
_USER_BY_NAME = select(User).where(func.lower(User.username) == bindparam("name"))
_users = table_of(User)
_USER_ID_BY_NAME = select(_users.c.id).where(func.lower(_users.c.username) == bindparam("name"))


def register(db: Database, *, username: str, password: str, rounds: int, credit: int, initial_balance: int) -> UserView:
    """Create a user with its balance account and the initial CPT grant.

    Raises InvalidArgument for a malformed name or password, Refused when the name is taken.
    """
    validate_username(username)
    validate_password(password)
    password_hash = hash_password(password, rounds)  # outside the transaction: it is slow

    def work(session: Session) -> UserView:
        if find_user(session, username) is not None:
            raise Refused(f"username {username!r} is already taken")
        user = User(username=username, password_hash=password_hash, credit_score=credit)
        session.add(user)
        session.flush()
        account = ledger.get_or_create_account(session, ledger.balance_key(user.id), "balance", user.id)
        if initial_balance:
            ledger.mint(session, to_account=account.id, amount=initial_balance, memo=f"welcome grant for {username}")
        return UserView(user.id, user.username, user.credit_score)

    try:
        return db.transaction(work)
    except IntegrityError as error:  # a concurrent registration of the same name won the race
        raise Refused(f"username {username!r} is already taken") from error


def verify_password(db: Database, username: str, password: str) -> UserView | None:
    """The user if ``password`` is theirs, else None (same cost whether or not the user exists)."""
    with db.reading() as session:
        user = find_user(session, username)
        view = UserView(user.id, user.username, user.credit_score) if user else None
        stored = user.password_hash.encode() if user else _DUMMY_HASH
    try:
        matches = bcrypt.checkpw(password.encode(), stored)
    except ValueError:
        matches = False
    return view if (matches and view is not None) else None


def get_user(db: Database, username: str) -> UserView:
    with db.reading() as session:
        user = find_user(session, username)
        if user is None:
            raise NotFound(f"no user named {username!r}")
        return UserView(user.id, user.username, user.credit_score)


def balance_of(db: Database, username: str) -> int:
    with db.reading() as session:
        user = find_user(session, username)
        if user is None:
            raise NotFound(f"no user named {username!r}")
        balance = session.scalar(select(Account.balance).where(Account.key == ledger.balance_key(user.id)))
        return int(balance or 0)


@dataclass(frozen=True)
class TransferOutcome:
    entry_id: int
    replayed: bool  # True when an earlier transfer with the same idempotency key answered


def transfer(
    db: Database, *, sender: str, receiver: str, amount: int, idempotency_key: str | None, max_amount: int
) -> TransferOutcome:
    """Move ``amount`` CPT from ``sender``'s balance to ``receiver``'s, atomically.

    With an idempotency key, a retry (same sender, key, receiver and amount) is answered with the
    first outcome and moves nothing; the same key with other details is refused.
    Raises InvalidArgument (a malformed amount or key) or Refused: NotFound (receiver),
    InsufficientBalance, the sender named as receiver, a key used for another transfer.
    """
    if amount <= 0:
        raise InvalidArgument("amount must be a positive whole number of CPT")
    if amount > max_amount:
        raise InvalidArgument(f"amount must be at most {max_amount} CPT")
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InvalidArgument("idempotency_key must be 1–128 characters of letters, digits, '_', '.', ':' or '-'")
    if sender.lower() == receiver.lower():
        raise Refused("cannot transfer to yourself: name another user as the receiver")

    def work(session: Session) -> TransferOutcome:
        payer = find_user(session, sender)
        payee = find_user(session, receiver)
        if payer is None:
            raise NotFound(f"no user named {sender!r}")
        if payee is None:
            raise NotFound(f"no user named {receiver!r}")
        if idempotency_key is not None:
            earlier = _replay(session, payer.id, idempotency_key, payee.id, amount)
            if earlier is not None:
                return earlier
        entry_id = ledger.post(
            session,
            kind="transfer",
            debit=ledger.account_id(session, ledger.balance_key(payer.id)),
            credit=ledger.account_id(session, ledger.balance_key(payee.id)),
            amount=amount,
            memo=f"{payer.username} → {payee.username}",
            initiator_id=payer.id,
            idempotency_key=idempotency_key,
        )
        return TransferOutcome(entry_id, replayed=False)

    try:
        return db.transaction(work)
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first: answer as it did.
        return db.transaction(work)


def _replay(session: Session, payer_id: int, key: str, payee_id: int, amount: int) -> TransferOutcome | None:
    entry = session.scalar(
        select(JournalEntry).where(JournalEntry.initiator_id == payer_id, JournalEntry.idempotency_key == key)
    )
    if entry is None:
        return None
    credit = [p for p in ledger.postings_of(session, entry.id) if p.amount > 0]
    payee_account = ledger.account_id(session, ledger.balance_key(payee_id))
    if entry.kind != "transfer" or not credit or credit[0].amount != amount or credit[0].account_id != payee_account:
        raise Refused("idempotency_key was already used for a different transfer: use a new key for a new transfer")
    return TransferOutcome(entry.id, replayed=True)

"""Uploads racing for one task id: one task, one escrow; the loser's answer says what happened."""

from __future__ import annotations

import functools
import threading
import uuid
from typing import Any, TypeAlias

import grpc
import pytest
import sqlalchemy as sa

from models import accounts, ledger, task_files
from models.tables import Account, JournalEntry, Posting, Task, TaskEvent
from orchestration import economy, uploads
from orchestration.lifecycle import Asker
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import task_zip

RACERS = 6
Outcome: TypeAlias = pb.UploadTaskResponse | grpc.StatusCode | None  # a reply, an error's code, or nothing yet


def race(pool: PoolHarness, requests: list[tuple[str, pb.UploadTaskRequest]]) -> list[Outcome]:
    """Send every (token, request) at once from its own thread and channel stub; each reply or error."""
    outcomes: list[Outcome] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int, token: str, request: pb.UploadTaskRequest) -> None:
        start.wait()
        try:
            outcomes[i] = pool.master.UploadTask(request, metadata=bearer(token), timeout=30)
        except grpc.RpcError as error:
            outcomes[i] = error.code()

    threads = [threading.Thread(target=send, args=(i, *pair)) for i, pair in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def listed(pool: PoolHarness, name: str) -> list[str]:
    with pool.ctx.db.reading() as session:
        user_id = accounts.user_id(session, name)
    assert user_id is not None
    return [task.task_id for task in pool.ctx.lifecycle.list_tasks(Asker(user_id, name))]


def request(task_id: str, body: str = "print('hi')\n") -> pb.UploadTaskRequest:
    return pb.UploadTaskRequest(
        task_id=task_id, task_zip=task_zip({"main.py": body}), cpu_score=100, memory_gb=1, location="Any"
    )


def test_the_same_upload_sent_at_once_makes_one_task_and_one_escrow(pool: PoolHarness) -> None:
    name, token = pool.new_user()
    before = pool.balance(token)
    task_id = f"race-{uuid.uuid4().hex[:8]}"

    same = request(task_id)
    outcomes = race(pool, [(token, same)] * RACERS)

    assert all(isinstance(o, pb.UploadTaskResponse) and o.success for o in outcomes), outcomes
    assert listed(pool, name) == [task_id]
    spent = before - pool.balance(token)
    assert spent > 0
    with pool.ctx.db.reading() as session:
        assert ledger.audit(session).ok
    # one escrow: a second upload of the same task charges nothing more
    assert race(pool, [(token, same)])[0].success  # type: ignore[union-attr]
    assert before - pool.balance(token) == spent


def test_different_users_racing_for_one_id_one_wins_the_others_are_told(pool: PoolHarness) -> None:
    users = [pool.new_user() for _ in range(RACERS)]
    task_id = f"race-{uuid.uuid4().hex[:8]}"

    sent = [(token, request(task_id, f"print({i})\n")) for i, (_, token) in enumerate(users)]
    outcomes = race(pool, sent)

    won = [i for i, o in enumerate(outcomes) if isinstance(o, pb.UploadTaskResponse) and o.success]
    assert len(won) == 1, outcomes
    assert all(o == grpc.StatusCode.PERMISSION_DENIED for i, o in enumerate(outcomes) if i not in won), outcomes
    winner_name, winner_token = users[won[0]]
    assert listed(pool, winner_name) == [task_id]
    stored = pool.kept_file(task_id, task_files.TASK_ZIP)
    assert stored == sent[won[0]][1].task_zip  # the winner's zip, not a loser's
    charged = {token for _, token in users if pool.balance(token) != pool.ctx.settings.INITIAL_BALANCE}
    assert charged == {winner_token}  # the losers paid nothing
    with pool.ctx.db.reading() as session:
        assert ledger.audit(session).ok


def test_one_users_uploads_at_once_are_taken_until_the_balance_runs_out(pool: PoolHarness) -> None:
    """On PostgreSQL each of these is one statement committed as it ends (the balance row locked
    only meanwhile); on SQLite a transaction. Either way no overdraft, and every task has its zip."""
    name, token = pool.new_user()
    before = pool.balance(token)
    first = f"rich-{uuid.uuid4().hex[:8]}"
    assert race(pool, [(token, request(first))])[0].success  # type: ignore[union-attr]
    price = before - pool.balance(token)
    affordable = pool.balance(token) // price
    assert affordable >= 2, "the default balance should cover a few tasks"

    sent = [request(f"rich-{uuid.uuid4().hex[:8]}", f"print({i})\n") for i in range(affordable + 3)]
    outcomes = race(pool, [(token, r) for r in sent])

    won = [r.task_id for r, o in zip(sent, outcomes, strict=True) if isinstance(o, pb.UploadTaskResponse) and o.success]
    refused = [o for o in outcomes if isinstance(o, pb.UploadTaskResponse) and not o.success]
    assert len(won) == affordable and len(refused) == 3, outcomes
    assert all("insufficient balance" in o.message for o in refused)  # type: ignore[union-attr]
    assert sorted(listed(pool, name)) == sorted([first, *won])
    assert pool.balance(token) == before - price * (affordable + 1)
    storage = pool.ctx.lifecycle.storage
    for r in sent:
        assert pool.kept_file(r.task_id, task_files.TASK_ZIP) == (r.task_zip if r.task_id in won else None)
    staged = [p for p in storage.root.rglob(".*") if p.is_file()]
    assert staged == []
    with pool.ctx.db.reading() as session:
        assert ledger.audit(session).ok


def test_a_task_whose_zip_was_not_put_in_place_gets_it_from_a_repeat_of_its_upload(
    make_pool, database_url: str
) -> None:
    """As when the server stopped between the task's commit and the zip's move (PostgreSQL's
    one-statement upload): the client, which got no answer, sends the upload again. (A zip kept in
    the database, INLINE_ZIP_BYTES, is written with its task: this pool keeps every zip as a file.)"""
    pool = make_pool(database_url=database_url, INLINE_ZIP_BYTES=0)
    _, token = pool.new_user()
    task_id = f"heal-{uuid.uuid4().hex[:8]}"
    sent = request(task_id)
    assert race(pool, [(token, sent)])[0].success  # type: ignore[union-attr]
    zip_path = pool.ctx.lifecycle.storage.task_zip(task_id)
    zip_path.unlink()
    balance = pool.balance(token)

    other = request(task_id, "print('another')\n")
    assert not race(pool, [(token, other)])[0].success  # type: ignore[union-attr]
    assert not zip_path.exists()  # a different zip under the same id is refused and not kept

    assert race(pool, [(token, sent)])[0].success  # type: ignore[union-attr]
    assert zip_path.read_bytes() == sent.task_zip
    assert pool.balance(token) == balance  # nothing charged twice


def test_the_one_statement_upload_writes_what_the_transaction_writes(pool: PoolHarness) -> None:
    """PostgreSQL's one-statement upload against the transaction SQLite uses (and PostgreSQL for a
    task without a price): the same task row, first event, escrow account, entry and postings."""
    if pool.ctx.db.is_sqlite:
        pytest.skip("the one-statement upload is PostgreSQL's; SQLite uploads in a transaction")
    name, _ = pool.new_user()
    with pool.ctx.db.reading() as session:
        owner = accounts.user_id(session, name)
    assert owner is not None
    made = {}
    for way in ("transaction", "alone"):
        task_id = f"{way}-{uuid.uuid4().hex[:8]}"
        wanted = uploads.UploadRequest(
            task_id=task_id,
            task_zip=task_zip({"main.py": "print('same')\n"}),
            needs={"cpu_score": 250, "memory_gb": 2, "gpu_score": 0, "gpu_memory_gb": 0},
            gpu_name="Any",
            location="Any",
            user_id=name,
            max_minutes=7,
        )
        if way == "alone":
            uploads.insert_alone(pool.ctx.db, wanted, name, pool.ctx.settings, owner_id=None)
        else:
            pool.ctx.db.transaction(
                functools.partial(
                    uploads.insert, request=wanted, caller=name, settings=pool.ctx.settings, owner_id=owner
                )
            )
        made[way] = written(pool, task_id)
    assert made["alone"] == made["transaction"]
    assert made["alone"]["escrow"][2] == 7 * made["alone"]["task"]["price_per_minute"] > 0
    with pool.ctx.db.reading() as session:
        assert ledger.audit(session).ok


def written(pool: PoolHarness, task_id: str) -> dict[str, Any]:
    """What an upload of ``task_id`` wrote, without its ids, names and times."""
    with pool.ctx.db.engine.connect() as conn:
        task = conn.execute(sa.select(Task).where(Task.task_id == task_id)).mappings().one()
        events = conn.execute(
            sa.select(
                TaskEvent.from_status, TaskEvent.to_status, TaskEvent.attempt, TaskEvent.node_id, TaskEvent.reason
            ).where(TaskEvent.task_pk == task["id"])
        ).all()
        escrow = conn.execute(
            sa.select(Account.id, Account.kind, Account.user_id, Account.balance).where(
                Account.key == economy.escrow_key(task["id"])
            )
        ).one()
        entries = conn.execute(
            sa.select(JournalEntry.kind, JournalEntry.initiator_id, JournalEntry.memo, Posting.amount)
            .join(Posting, Posting.entry_id == JournalEntry.id)
            .where(JournalEntry.id.in_(sa.select(Posting.entry_id).where(Posting.account_id == escrow.id)))
            .order_by(Posting.amount)
        ).all()
    skipped = {"id", "task_id", "created_at", "updated_at", "next_attempt_at"}
    return {
        "task": {k: v for k, v in task.items() if k not in skipped},
        "events": events,
        "escrow": tuple(escrow)[1:],
        "entries": [(kind, who, memo.replace(task_id, "<id>"), amount) for kind, who, memo, amount in entries],
        "stamped": all(task[k] is not None for k in skipped - {"id", "task_id"}),
    }

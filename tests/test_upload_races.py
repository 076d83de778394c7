"""Uploads racing for one task id: one task, one escrow; the loser's answer says what happened."""

from __future__ import annotations

import threading
import uuid

import grpc

from models import accounts, ledger
from orchestration.lifecycle import Asker
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import task_zip

RACERS = 6


def race(pool: PoolHarness, requests: list[tuple[str, pb.UploadTaskRequest]]) -> list[object]:
    """Send every (token, request) at once from its own thread and channel stub; each reply or error."""
    outcomes: list[object] = [None] * len(requests)
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
    stored = pool.ctx.lifecycle.storage.task_zip(task_id).read_bytes()
    assert stored == sent[won[0]][1].task_zip  # the winner's zip, not a loser's
    charged = {token for _, token in users if pool.balance(token) != pool.ctx.settings.INITIAL_BALANCE}
    assert charged == {winner_token}  # the losers paid nothing
    with pool.ctx.db.reading() as session:
        assert ledger.audit(session).ok

"""Conservation of CPT under real concurrency, over gRPC, on SQLite and PostgreSQL (SPEC §7).

8 threads × 60 random transfers (valid, invalid, and retries of earlier ones with the same
idempotency key) among 20 users, while a sampler reads the balances continuously. The threads
start together from a barrier, so their transfers race from the first one on.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter

import grpc
import sqlalchemy as sa

from models import ledger
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer, unique_name

THREADS = 8
OPS_PER_THREAD = 60
USERS = 20


def test_transfers_conserve_cpt_under_concurrency(pool: PoolHarness) -> None:
    names = [pool.register(unique_name("c")) for _ in range(USERS)]
    tokens = {name: pool.login(name) for name in names}
    total = USERS * pool.settings.INITIAL_BALANCE
    accepted: dict[str, tuple[str, str, int]] = {}  # idempotency key -> (from, to, amount)
    sent: list[tuple[str, pb.TransferRequest]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    samples: list[tuple[int, int]] = []
    done = threading.Event()
    start = threading.Barrier(THREADS)
    user_keys = [ledger.balance_key(uid) for uid in _user_ids(pool, names)]

    def sampler() -> None:
        query = sa.text("SELECT COALESCE(SUM(balance), 0), COALESCE(MIN(balance), 0) FROM accounts WHERE key IN :keys")
        query = query.bindparams(sa.bindparam("keys", expanding=True))
        while not done.is_set():
            with pool.ctx.db.reading() as session:
                row = session.execute(query, {"keys": user_keys}).one()
            samples.append((int(row[0]), int(row[1])))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait(timeout=30)
            for _ in range(OPS_PER_THREAD):
                roll = rng.random()
                if roll < 0.2 and sent:
                    with lock:
                        sender, request = rng.choice(sent)
                elif roll < 0.3:
                    sender = rng.choice(names)
                    request = rng.choice(
                        [
                            pb.TransferRequest(receiver_username=sender, amount=5),
                            pb.TransferRequest(receiver_username=rng.choice(names), amount=-rng.randint(0, 50)),
                            pb.TransferRequest(receiver_username=unique_name("ghost"), amount=5),
                        ]
                    )
                else:
                    sender, receiver = rng.sample(names, 2)
                    request = pb.TransferRequest(
                        receiver_username=receiver, amount=rng.randint(1, 400), idempotency_key=uuid.uuid4().hex
                    )
                    with lock:
                        sent.append((sender, request))
                try:
                    reply = pool.users.Transfer(request, metadata=bearer(tokens[sender]))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                    continue
                if reply.success:
                    assert request.idempotency_key, "only keyed, valid transfers can succeed here"
                    with lock:
                        accepted[request.idempotency_key] = (sender, request.receiver_username, request.amount)
        except BaseException as error:
            errors.append(error)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert not errors, errors[0]

    # At every instant the sampler looked: the sum never moved and nobody was negative.
    assert samples, "the sampler took no reading"
    assert {s for s, _ in samples} == {total}
    assert min(m for _, m in samples) >= 0

    # Each party's balance is what the accepted transfers say, each applied exactly once.
    expected = Counter({name: pool.settings.INITIAL_BALANCE for name in names})
    for sender, receiver, amount in accepted.values():
        expected[sender] -= amount
        expected[receiver] += amount
    assert {name: pool.balance(tokens[name]) for name in names} == dict(expected)
    with pool.ctx.db.reading() as session:
        posted = session.execute(
            sa.text(
                "SELECT idempotency_key, COUNT(*) FROM journal_entries WHERE kind = 'transfer' "
                "AND idempotency_key IN :keys GROUP BY idempotency_key"
            ).bindparams(sa.bindparam("keys", expanding=True)),
            {"keys": [request.idempotency_key for _, request in sent]},
        ).all()
        report = ledger.audit(session)
    assert {key for key, _ in posted} == set(accepted)
    assert all(count == 1 for _, count in posted)
    assert report.ok, report.problems
    assert len(accepted) > 100, "the run should have moved money many times"


def _user_ids(pool: PoolHarness, names: list[str]) -> list[int]:
    with pool.ctx.db.reading() as session:
        rows = session.execute(sa.text("SELECT id, username FROM users")).all()
    ids = {name: uid for uid, name in rows}
    return [ids[name] for name in names]

"""Allocation never goes over capacity, with several OS processes at once (SPEC §5).

Four processes allocate and release against 50 nodes with random needs (some too big to fit
anywhere, some racing for the same task attempt) while the test process samples the invariant
``0 ≤ available ≤ capacity`` and ``available + Σ active allocations = capacity`` continuously.
"""

from __future__ import annotations

import functools
import multiprocessing
import random
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from models import allocation, schema
from models.db import Database
from models.tables import Allocation, Node, User

PROCESSES = 4
NODES = 50
OPS = 250


def _seed(db: Database, run: str, count: int = NODES) -> list[int]:
    def work(session: sa.orm.Session) -> list[int]:
        owner = User(username=f"own{run}", password_hash="x", credit_score=50)
        session.add(owner)
        session.flush()
        rng = random.Random(run)
        pks = []
        for i in range(count):
            cap = {
                "cpu_score": rng.randint(100, 1000),
                "memory_gb": rng.randint(1, 32),
                "gpu_score": rng.choice([0, 0, 500]),
                "gpu_memory_gb": rng.choice([0, 0, 8]),
            }
            node = Node(
                node_id=f"own{run}/n{i}",
                owner_id=owner.id,
                hostname="127.0.0.1",
                port=1,
                cpu_cores=4,
                gpu_name="",
                location="",
                docker_status="enabled",
                tier="normal",
                status="online",
                running_tasks=0,
                **{f"cap_{d}": v for d, v in cap.items()},
                **{f"avail_{d}": v for d, v in cap.items()},
            )
            session.add(node)
            session.flush()
            pks.append(node.id)
        return pks

    return db.transaction(work)


def held_ids(rows: list[Any]) -> set[int]:
    """The pks of the nodes a hold took (its rows)."""
    return {row.id for row in rows}


def _allocate_group(session: sa.orm.Session, group: list[tuple[str, int, allocation.Need]]) -> list[int]:
    shares: dict[int, tuple[allocation.Need, int]] = {}
    for _, node_pk, need in group:
        total, count = shares.get(node_pk, (allocation.Need(), 0))
        shares[node_pk] = (total.plus(need), count + 1)
    held = held_ids(allocation.hold_many(session, shares))
    rows = [
        Allocation(node_pk=node_pk, task_id=task_id, attempt=1, **need.as_dict())
        for task_id, node_pk, need in group
        if node_pk in held
    ]
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def _worker(url: str, run: str, node_pks: list[int], seed: int, results: multiprocessing.Queue) -> None:
    db = Database(url, pool_size=2)
    rng = random.Random(seed)
    held: list[int] = []
    allocated = refused = released = 0
    for _ in range(OPS):
        if held and rng.random() < 0.45:
            allocation_id = held.pop(rng.randrange(len(held)))
            assert db.transaction(functools.partial(allocation.release, allocation_id=allocation_id, reason="test"))
            # Releasing twice is harmless.
            assert not db.transaction(functools.partial(allocation.release, allocation_id=allocation_id, reason="test"))
            released += 1
            continue
        need = allocation.Need(
            cpu_score=rng.randint(1, 600),
            memory_gb=rng.randint(0, 40),
            gpu_score=rng.choice([0, 0, 0, 300]),
            gpu_memory_gb=rng.choice([0, 0, 4, 16]),
        )
        # Every process races for the same small set of task attempts: at most one may win each.
        task_id = f"{run}-t{rng.randrange(OPS // 2)}"
        node = rng.choice(node_pks)
        if rng.random() < 0.3:  # as matching does: a batch's holds in one statement, then its rows
            group = [(f"{run}-t{rng.randrange(OPS // 2)}", rng.choice(node_pks[:5]), need) for _ in range(3)]
            try:
                ids = db.transaction(functools.partial(_allocate_group, group=group))
            except IntegrityError:  # an attempt of the group was allocated first: all of it rolled back
                refused += len(group)
                continue
            allocated += len(ids)
            refused += len(group) - len(ids)
            held.extend(ids)
            continue
        got = db.transaction(
            functools.partial(allocation.allocate, node_pk=node, task_id=task_id, attempt=1, need=need)
        )
        if got is None:
            refused += 1
        else:
            allocated += 1
            held.append(got)
    results.put((allocated, refused, released))
    db.dispose()


def test_concurrent_processes_never_over_allocate(database_url: str) -> None:
    db = Database(database_url)
    schema.upgrade(db.engine)
    run = f"{random.randrange(10**9)}"
    node_pks = _seed(db, run)
    violations: list[str] = []
    samples = 0
    stop = threading.Event()

    def sampler() -> None:
        nonlocal samples
        while not stop.is_set():
            with db.reading() as session:
                violations.extend(allocation.invariant_violations(session))
            samples += 1

    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(database_url, run, node_pks, seed, results)) for seed in range(PROCESSES)
    ]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    time.sleep(0.05)
    stop.set()
    watcher.join()

    assert samples > 5, "the sampler must have looked many times while the processes ran"
    assert violations == []
    assert sum(a for a, _, _ in outcomes) > 50 and sum(r for _, r, _ in outcomes) > 50
    with db.reading() as session:
        doubles = session.execute(
            sa.text(
                "SELECT task_id, COUNT(*) FROM allocations WHERE task_id LIKE :p GROUP BY task_id, attempt "
                "HAVING COUNT(*) > 1"
            ),
            {"p": f"{run}-%"},
        ).all()
        assert doubles == []
        assert allocation.invariant_violations(session) == []
    db.dispose()


def test_a_node_takes_all_of_its_share_of_a_batch_or_none(database_url: str) -> None:
    db = Database(database_url)
    schema.upgrade(db.engine)
    run = f"{random.randrange(10**9)}"
    pks = _seed(db, run)[:4]
    roomy, offline, capped, small = pks

    def setup(session: sa.orm.Session) -> None:
        for pk in pks:
            session.execute(
                sa.update(Node)
                .where(Node.id == pk)
                .values(
                    status="offline" if pk == offline else "online",
                    max_tasks=1 if pk == capped else None,
                    **{f"cap_{d}": 100 for d in ("cpu_score", "memory_gb")},
                    **{f"avail_{d}": 10 if pk == small else 100 for d in ("cpu_score", "memory_gb")},
                    cap_gpu_score=0,
                    avail_gpu_score=0,
                    cap_gpu_memory_gb=0,
                    avail_gpu_memory_gb=0,
                )
            )

    db.transaction(setup)
    each = allocation.Need(cpu_score=6, memory_gb=6)
    two = allocation.Need(cpu_score=12, memory_gb=12)
    held = db.transaction(
        lambda s: held_ids(
            allocation.hold_many(s, {roomy: (two, 2), offline: (each, 1), capped: (two, 2), small: (two, 2)})
        )
    )
    assert held == {roomy}  # offline; two tasks past a cap of one; 12 where 10 are free
    with db.reading() as session:
        query = sa.select(Node.id, Node.avail_cpu_score, Node.avail_memory_gb, Node.running_tasks)
        rows = {row.id: tuple(row)[1:] for row in session.execute(query.where(Node.id.in_(pks)))}
    assert rows == {roomy: (88, 88, 2), offline: (100, 100, 0), capped: (100, 100, 0), small: (10, 10, 0)}
    assert db.transaction(lambda s: held_ids(allocation.hold_many(s, {small: (each, 1), capped: (each, 1)}))) == {
        small,
        capped,
    }
    assert db.transaction(lambda s: allocation.hold_many(s, {})) == []
    db.dispose()


def test_holds_for_more_nodes_than_one_statement_takes(database_url: str) -> None:
    """hold_many splits its shares into statements of at most _MAX_SHARES rows, each padded to a
    power of two with rows that match no node: every node still takes its own share exactly once."""
    db = Database(database_url)
    schema.upgrade(db.engine)
    run = f"{random.randrange(10**9)}"
    pks = _seed(db, run, count=allocation._MAX_SHARES + 77)  # two statements: 512 rows, then 77 padded to 128
    db.transaction(
        lambda s: s.execute(
            sa.update(Node)
            .where(Node.id.in_(pks))
            .values(
                status=sa.case((Node.id.in_(pks[::10]), "offline"), else_="online"),
                **{f"{k}_{d}": 100 for k in ("cap", "avail") for d in ("cpu_score", "memory_gb")},
                **{f"{k}_{d}": 0 for k in ("cap", "avail") for d in ("gpu_score", "gpu_memory_gb")},
            )
        )
    )
    shares = {pk: (allocation.Need(cpu_score=1 + i % 7, memory_gb=2), 1 + i % 3) for i, pk in enumerate(pks)}
    held = db.transaction(lambda s: held_ids(allocation.hold_many(s, shares)))
    assert held == {pk for i, pk in enumerate(pks) if i % 10}
    with db.reading() as session:
        rows = session.execute(
            sa.select(Node.id, Node.avail_cpu_score, Node.avail_memory_gb, Node.running_tasks).where(Node.id.in_(pks))
        ).all()
    for pk, cpu, memory, running in rows:
        need, tasks = shares[pk]
        expected = (100 - need.cpu_score, 98, tasks) if pk in held else (100, 100, 0)
        assert (cpu, memory, running) == expected
    db.dispose()

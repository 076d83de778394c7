"""The matcher's node catalog, kept current from the nodes changed since its last look, on SQLite
and PostgreSQL: what it reads again, what it skips, and what it must never miss."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from models import allocation, schema
from models.db import create_db_engine
from models.tables import Node, User, table_of, utcnow
from orchestration import catalog as catalog_module
from orchestration.catalog import NodeCatalog
from orchestration.policies.matching import Resources, TaskNeeds
from orchestration.policies.trust import TrustThresholds

NODES = 12
SIZE = (("cpu_score", 500), ("memory_gb", 8), ("gpu_score", 0), ("gpu_memory_gb", 0))
nodes = table_of(Node)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_db_engine(database_url)  # SQLite as the pool runs it: its transactions begun explicitly
    if database_url.startswith("sqlite"):
        schema.upgrade(engine)
    old = utcnow() - timedelta(hours=1)
    with engine.begin() as conn:
        owner = conn.execute(
            sa.insert(table_of(User))
            .values(username="owner", password_hash="x", credit_score=500)
            .returning(table_of(User).c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(nodes),
            [
                {
                    "node_id": f"n{i:02d}",
                    "owner_id": owner,
                    "hostname": "127.0.0.1",
                    "port": 1,
                    "docker_status": "enabled",
                    "tier": "normal",
                    "status": "online",
                    **{f"cap_{d}": v for d, v in SIZE},
                    **{f"avail_{d}": v for d, v in SIZE},
                    "registered_at": old,
                    "changed_at": old,
                }
                for i in range(NODES)
            ],
        )
    yield engine
    engine.dispose()


def change(engine: sa.Engine, *node_ids: str, at: object = None, **values: object) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(nodes).where(nodes.c.node_id.in_(node_ids)).values(changed_at=at or utcnow(), **values))


def refresh(engine: sa.Engine, catalog: NodeCatalog) -> int:
    with Session(engine) as session:
        return catalog.refresh(session)


def seen(catalog: NodeCatalog, node_id: str) -> tuple[int, int]:
    """The catalog's view of a node: its CPU score available, its tasks running."""
    view = catalog.index.get(node_id)
    assert view is not None
    return view.available.cpu_score, view.running_tasks


def test_the_first_look_loads_every_node_and_a_look_without_changes_loads_none(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    assert refresh(engine, catalog) == NODES
    assert sorted(v.node_id for v in catalog.index.views()) == [f"n{i:02d}" for i in range(NODES)]

    change(engine, "n00", "n01", avail_cpu_score=100)
    assert refresh(engine, catalog) == 2
    # Both are still inside the look-back of the next look: read by their stamps, not rebuilt.
    assert refresh(engine, catalog) == 0
    assert refresh(engine, catalog) == 0


def test_nodes_found_unchanged_are_read_by_their_stamps_only(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    change(engine, "n00", "n01", "n02", avail_cpu_score=100)
    refresh(engine, catalog)
    change(engine, "n02", avail_cpu_score=90)  # n00 and n01 are inside the look-back, unchanged since
    statements: list[tuple[str, object]] = []

    def seen(conn: object, cursor: object, statement: str, parameters: object, *_: object) -> None:
        statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        assert refresh(engine, catalog) == 1
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert len(statements) == 2, statements  # the stamps of the three, then the one changed, whole
    assert "avail_cpu_score" not in statements[0][0]
    assert "avail_cpu_score" in statements[1][0] and "n02" in str(statements[1][1])
    assert "n00" not in str(statements[1][1]) and "n01" not in str(statements[1][1])


def test_a_changed_node_is_seen_as_it_is_now(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    change(engine, "n03", avail_cpu_score=120, running_tasks=1)
    assert refresh(engine, catalog) == 1
    assert seen(catalog, "n03") == (120, 1)

    change(engine, "n03", avail_cpu_score=60, running_tasks=2)  # changed again, inside the look-back
    assert refresh(engine, catalog) == 1
    assert seen(catalog, "n03") == (60, 2)


def test_a_node_gone_offline_is_no_candidate_any_more(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    change(engine, "n05", status="offline")
    assert refresh(engine, catalog) == 1
    view = catalog.index.get("n05")
    assert view is not None and not view.online
    anything = TaskNeeds(Resources(1, 1, 0, 0), submitter_credit=1000)
    offered = {v.node_id for v in catalog.index.candidates(anything, TrustThresholds(), NODES)}
    assert offered == {f"n{i:02d}" for i in range(NODES)} - {"n05"}  # never chosen


def test_a_change_committed_after_a_later_one_is_not_missed(engine: sa.Engine) -> None:
    """A transaction may stamp its change, then commit after another's later stamp was seen."""
    catalog = NodeCatalog()
    refresh(engine, catalog)
    now = utcnow()
    change(engine, "n07", at=now, avail_memory_gb=4)
    assert refresh(engine, catalog) == 1
    change(engine, "n08", at=now - timedelta(seconds=1), avail_memory_gb=2)  # stamped earlier, seen later
    assert refresh(engine, catalog) == 1
    view = catalog.index.get("n08")
    assert view is not None and view.available.memory_gb == 2


def test_more_changed_nodes_than_one_read_takes_are_all_applied(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "READ_AT_ONCE", 3)
    catalog = NodeCatalog()
    refresh(engine, catalog)
    changed = [f"n{i:02d}" for i in range(8)]
    change(engine, *changed, avail_cpu_score=77)
    assert refresh(engine, catalog) == 8
    views = [catalog.index.get(n) for n in changed]
    assert all(v is not None and v.available.cpu_score == 77 for v in views)
    assert refresh(engine, catalog) == 0


def test_forgetting_loads_every_node_again(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    catalog.forget()
    assert refresh(engine, catalog) == NODES


def hold(engine: sa.Engine, catalog: NodeCatalog, *node_ids: str) -> None:
    """Hold a task's worth on each node as a matching batch does, noting the rows; committed."""
    need = allocation.Need(cpu_score=100, memory_gb=1)
    with Session(engine) as session, session.begin():
        shares = {catalog.pks[node_id]: (need, 1) for node_id in node_ids}
        catalog.holding(allocation.hold_many(session, shares))


def test_nodes_changed_by_our_own_committed_holds_are_not_read_again(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    hold(engine, catalog, "n00", "n01")
    catalog.committed()
    assert seen(catalog, "n00") == (400, 1)  # the row as held
    assert refresh(engine, catalog) == 0

    change(engine, "n00", avail_cpu_score=450, running_tasks=0)  # someone else's change after ours
    assert refresh(engine, catalog) == 1
    assert seen(catalog, "n00") == (450, 0)


def test_a_change_made_before_our_holds_are_applied_is_still_read(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    hold(engine, catalog, "n02")
    change(engine, "n02", avail_cpu_score=500, running_tasks=0)  # committed between our commit and our look
    catalog.committed()
    assert refresh(engine, catalog) == 1
    assert seen(catalog, "n02") == (500, 0)


def test_holds_noted_then_forgotten_are_never_applied(engine: sa.Engine) -> None:
    catalog = NodeCatalog()
    refresh(engine, catalog)
    with Session(engine) as session, session.begin():
        catalog.holding(allocation.hold_many(session, {catalog.pks["n03"]: (allocation.Need(cpu_score=100), 1)}))
        session.rollback()
    catalog.forget()  # as matching does when its transaction fails
    catalog.committed()
    assert refresh(engine, catalog) == NODES
    assert seen(catalog, "n03") == (500, 0)

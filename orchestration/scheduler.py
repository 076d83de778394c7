"""Matching: place due PENDING tasks on nodes, in batches, through an in-memory candidate index.

Each worker process keeps a :class:`~orchestration.catalog.NodeCatalog` (a CandidateIndex refreshed from the nodes
changed since its last look), so a decision does not scan every node. The index is advisory:
the database's conditional allocation decides, and a stale view only costs a retry with the
next candidate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime
from functools import partial

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import allocation, bulk, tasks
from models.db import Database
from models.tables import RESOURCE_DIMENSIONS, Allocation, utcnow
from orchestration.catalog import NodeCatalog
from orchestration.nodes import thresholds
from orchestration.policies.matching import NodeView, Resources, TaskNeeds, explain_pending
from orchestration.policies.trust import TrustThresholds
from pool.settings import Settings

log = logging.getLogger("orchestration.scheduler")

CANDIDATES_PER_TASK = 6
EXPLANATIONS_PER_BATCH = 20


def needs_of(task: tasks.TaskView) -> TaskNeeds:
    resources = Resources(*(task.needs[d] for d in RESOURCE_DIMENSIONS))
    return TaskNeeds(resources, gpu_name=task.gpu_name, location=task.location, submitter_credit=task.owner_credit)


def candidates(catalog: NodeCatalog, task: tasks.TaskView, t: TrustThresholds, rng: random.Random) -> list[NodeView]:
    """The best node first (fair among equals), then a few runners-up; nodes that failed this task last."""
    needs = needs_of(task)
    best = catalog.index.choose(needs, t, rng=rng)
    if best is None:
        return []
    others = catalog.index.candidates(needs, t, CANDIDATES_PER_TASK + len(task.excluded_nodes))
    ordered = [best] + [n for n in others if n.node_id != best.node_id]
    fresh = [n for n in ordered if n.node_id not in task.excluded_nodes]
    return fresh[:CANDIDATES_PER_TASK] or ordered[:1]


class _Lost(Exception):
    """Another scheduler moved the task first: roll our allocation back."""


def _assign_in(session: Session, task: tasks.TaskView, node: NodeView, node_pk: int) -> bool:
    """Allocate on ``node`` and move the task PENDING → ASSIGNED (next attempt), in a savepoint of
    the batch's transaction: a task another scheduler took first costs only its own savepoint."""
    attempt = task.attempt + 1
    need = allocation.Need(**task.needs)
    try:
        with session.begin_nested():
            if allocation.allocate(session, node_pk=node_pk, task_id=task.task_id, attempt=attempt, need=need) is None:
                return False
            moved = tasks.transition(
                session,
                task,
                to=tasks.ASSIGNED,
                expected={tasks.PENDING},
                at_attempt=task.attempt,
                reason=f"matched to {node.node_id} ({node.tier.label} tier)",
                node_id=node.node_id,
                attempt=attempt,
                node_pk=node_pk,
                pending_reason="",
                started_at=None,
                accrued_until=None,
            )
            if not moved:
                raise _Lost
    except _Lost:
        return False
    return True


Placement = tuple[list[tuple[tasks.TaskView, NodeView]], list[tasks.TaskView]]


def _place(
    session: Session,
    catalog: NodeCatalog,
    due: list[tasks.TaskView],
    t: TrustThresholds,
    rng: random.Random,
    take: Callable[[tasks.TaskView, NodeView, int], bool],
) -> Placement:
    """Each task on its first candidate node that ``take`` (task, node, node pk) accepts."""
    placed: list[tuple[tasks.TaskView, NodeView]] = []
    unplaced: list[tasks.TaskView] = []
    for task in due:
        for node in candidates(catalog, task, t, rng):
            if take(task, node, catalog.pks[node.node_id]):
                catalog.took(node, needs_of(task).resources)
                placed.append((task, node))
                break
            catalog.refresh(session)  # our view of that node was stale
        else:
            unplaced.append(task)
    return placed, unplaced


def _place_each(
    session: Session, catalog: NodeCatalog, due: list[tasks.TaskView], t: TrustThresholds, rng: random.Random
) -> Placement:
    """Place task by task, each in a savepoint (:func:`_assign_in`)."""
    return _place(session, catalog, due, t, rng, partial(_assign_in, session))


def _hold_first_choices(
    session: Session, catalog: NodeCatalog, due: list[tasks.TaskView], t: TrustThresholds, rng: random.Random
) -> Placement:
    """Each task on its best node, all of them held in one statement (:func:`allocation.hold_many`,
    a node's tasks together). Only the tasks of a node that could not take its share go on to
    their next candidates, one at a time (:func:`_place`)."""
    chosen: list[tuple[tasks.TaskView, NodeView, int]] = []  # (task, node, node pk)
    shares: dict[int, tuple[allocation.Need, int]] = {}
    before: dict[int, NodeView] = {}  # node pk -> its view before this batch chose it
    unplaced: list[tasks.TaskView] = []
    for task in due:
        options = candidates(catalog, task, t, rng)
        if not options:
            unplaced.append(task)
            continue
        node, pk = options[0], catalog.pks[options[0].node_id]
        before.setdefault(pk, node)
        catalog.took(node, needs_of(task).resources)  # the next task of the batch sees the room left
        total, count = shares.get(pk, (allocation.Need(), 0))
        shares[pk] = (total.plus(allocation.Need(**task.needs)), count + 1)
        chosen.append((task, node, pk))
    rows = allocation.hold_many(session, shares)
    catalog.holding(rows)
    held = {node.id for node in rows}
    placed = [(task, node) for task, node, pk in chosen if pk in held]
    missed = [task for task, _, pk in chosen if pk not in held]
    if missed:
        for pk, view in before.items():
            if pk not in held:
                catalog.index.upsert(view)  # what it took for them did not happen
        catalog.refresh(session)  # our view of those nodes was stale
        more, still = _place(session, catalog, missed, t, rng, partial(_hold_one, session))
        placed, unplaced = placed + more, unplaced + still
    return placed, unplaced


def _hold_one(session: Session, task: tasks.TaskView, _node: NodeView, node_pk: int) -> bool:
    return allocation.hold(session, node_pk, allocation.Need(**task.needs))


def _place_batch(
    session: Session, catalog: NodeCatalog, due: list[tasks.TaskView], t: TrustThresholds, rng: random.Random
) -> Placement:
    """Place the whole batch in a few statements: lock the tasks still PENDING at their attempt,
    hold resources on their nodes (:func:`_hold_first_choices`), then insert the allocations and
    move the tasks to ASSIGNED in two multi-row statements."""
    current = tasks.lock(session, [task.pk for task in due])
    still_pending = [task for task in due if current.get(task.pk) == (tasks.PENDING, task.attempt)]
    # the others were moved first by another scheduler
    placed, unplaced = _hold_first_choices(session, catalog, still_pending, t, rng)
    if placed:
        bulk.insert_rows(
            session,
            Allocation,
            [
                {
                    "node_pk": catalog.pks[node.node_id],
                    "task_id": task.task_id,
                    "attempt": task.attempt + 1,
                    **task.needs,
                }
                for task, node in placed
            ],
        )
        moves = [
            tasks.Move(
                task,
                task.attempt,
                f"matched to {node.node_id} ({node.tier.label} tier)",
                node.node_id,
                {
                    "attempt": task.attempt + 1,
                    "node_pk": catalog.pks[node.node_id],
                    "pending_reason": "",
                    "started_at": None,
                    "accrued_until": None,
                },
            )
            for task, node in placed
        ]
        tasks.transition_many(session, moves, to=tasks.ASSIGNED, expected={tasks.PENDING}, locked=current)
    return placed, unplaced


def _log_placed(task: tasks.TaskView, node: NodeView) -> None:
    need = allocation.Need(**task.needs)
    attempt = task.attempt + 1
    log.info(
        "Task %s assigned to node %s, trust level: %s",
        task.task_id,
        node.node_id,
        node.tier.label,
        extra={"event": "task_assigned", "task_id": task.task_id, "node_id": node.node_id, "attempt": attempt},
    )
    log.info(
        "Node %s resource allocation: CPU-%d, Memory-%dGB",
        node.node_id,
        need.cpu_score,
        need.memory_gb,
        extra={"event": "resources_allocated", "node_id": node.node_id, "task_id": task.task_id, **need.as_dict()},
    )


def match_pending(
    db: Database,
    catalog: NodeCatalog,
    settings: Settings,
    *,
    rng: random.Random,
    now: datetime | None = None,
    placed_then: Callable[[list[tuple[str, int]]], object] | None = None,
) -> list[tuple[str, int]]:
    """Place up to MATCH_BATCH due PENDING tasks, in one transaction; the (task_id, attempt) pairs
    to dispatch. One commit per batch, not per task, is what lets matching keep up with a burst.

    ``placed_then(pairs)`` is called once they are committed, before the placements are logged
    and the unplaced explained: two log lines a task took a sixth of a small batch's time, which
    the tasks need not wait for to be dispatched."""
    now = now or utcnow()
    t = thresholds(settings)
    with db.reading() as session:
        due = tasks.due_pending(session, now, settings.MATCH_BATCH)
        if not due:  # common: a job asked for by returned capacity, or whose tasks an earlier one took
            return []
        catalog.refresh(session)  # only for a job with work: a refresh reads every node changed lately

    tries = 0

    def place(session: Session, *, batch: bool) -> tuple[list[tuple[tasks.TaskView, NodeView]], list[tasks.TaskView]]:
        nonlocal tries
        tries += 1
        if tries > 1:  # a retry: the index saw allocations that were rolled back
            catalog.forget()
            catalog.refresh(session)
        return (_place_batch if batch else _place_each)(session, catalog, due, t, rng)

    try:
        try:
            placed, unexplained = db.transaction(partial(place, batch=True))
        except IntegrityError:  # an attempt held an allocation already: let the careful path sort it out
            log.warning("a batch placement met an existing allocation; placing those tasks one at a time")
            placed, unexplained = db.transaction(partial(place, batch=False))
    except Exception:
        catalog.forget()  # it saw allocations that were rolled back
        raise
    catalog.committed()
    attempts = [(task.task_id, task.attempt + 1) for task, _ in placed]
    try:
        if placed_then is not None:
            placed_then(attempts)
    finally:
        for task, node in placed:
            _log_placed(task, node)
    for task in unexplained[:EXPLANATIONS_PER_BATCH]:
        reason = explain_pending(catalog.index.views(), needs_of(task), t) or "waiting for capacity"
        if reason != task.pending_reason:
            db.transaction(partial(_explain, pk=task.pk, reason=reason))
    return attempts


def _explain(session: Session, *, pk: int, reason: str) -> None:
    tasks.set_fields(session, pk, pending_reason=reason[:300])

"""Why a task is still PENDING, computed fresh from the nodes in the database.

The scheduler stores a reason on each task it could not place (``tasks.pending_reason``), but
only when a matching job runs. This answers on demand, from the current nodes, with the same
pure policy (``matching.explain_pending``) and a count of the nodes each filter turns away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from models import nodes, tasks
from orchestration.lifecycle import Asker, Lifecycle
from orchestration.nodes import thresholds
from orchestration.policies.matching import NodeView, Rejection, Resources, TaskNeeds, check, explain_pending
from orchestration.policies.trust import Tier, TrustThresholds
from orchestration.scheduler import needs_of

PLACEABLE = "a node can take it now; it will be placed at the next matching round"


@dataclass(frozen=True)
class Explanation:
    """Why ``task_id`` waits. ``reason`` and ``filters`` are empty unless the task is PENDING.

    ``filters`` has every matching filter in the order ``check`` applies them, with the number
    of nodes it turns away (each node counted once, at the first filter it fails).
    """

    task_id: str
    status: str
    reason: str
    filters: tuple[tuple[str, int], ...]


def node_view(record: nodes.NodeRecord) -> NodeView:
    """The scheduler's view of a node record (as ``catalog.NodeCatalog.refresh`` builds it)."""
    return NodeView(
        node_id=record.node_id,
        tier=Tier[record.tier.upper()],
        online=record.status == "online",
        capacity=Resources(**record.capacity),
        available=Resources(**record.available),
        gpu_name=record.gpu_name,
        location=record.location,
        running_tasks=record.running_tasks,
        max_tasks=record.max_tasks,
    )


def filter_counts(views: Iterable[NodeView], needs: TaskNeeds, t: TrustThresholds) -> tuple[tuple[str, int], ...]:
    """How many nodes each filter rejects, for every filter in ``Rejection`` order (zeros included)."""
    rejected = Counter(check(view, needs, t) for view in views)
    return tuple((reason.value, rejected.get(reason, 0)) for reason in Rejection)


def explain(views: Iterable[NodeView], needs: TaskNeeds, t: TrustThresholds) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(reason in words, counts per filter) for a pending task with ``needs`` over ``views``."""
    fleet = list(views)
    reason = explain_pending(fleet, needs, t) or PLACEABLE
    return reason, filter_counts(fleet, needs, t)


def explain_task(lifecycle: Lifecycle, caller: Asker, task_id: str) -> Explanation:
    """Explain one of ``caller``'s tasks (operators: any task).

    Raises InvalidArgument for a malformed id, NotFound when there is no such task, and
    PermissionDenied when it belongs to someone else; Unavailable when the database is down.
    """
    with lifecycle.db.reading() as session:
        task = lifecycle.owned(session, caller, task_id)
        if task.status != tasks.PENDING:
            return Explanation(task.task_id, task.status, "", ())
        records = nodes.list_all(session)
    reason, filters = explain((node_view(r) for r in records), needs_of(task), thresholds(lifecycle.settings))
    return Explanation(task.task_id, task.status, reason, filters)

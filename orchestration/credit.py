"""Credit (trust) changes: by outcomes and by operators. Tiers of the user's nodes follow at once."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import bulk, nodes
from models.accounts import find_user
from models.db import Database
from models.errors import InvalidArgument, NotFound
from models.tables import CreditEvent, Node, User
from orchestration import economy
from orchestration.nodes import thresholds, tier_label
from orchestration.policies.pricing import credit_after
from pool.settings import Settings


def change_credit(session: Session, user_id: int | None, change: int, reason: str, settings: Settings) -> None:
    """Move a user's credit by ``change`` (clamped to [0, 1000]) and re-tier their nodes."""
    if user_id is None or change == 0:
        return
    economy.change_credit(session, user_id, change, reason)
    t = thresholds(settings)
    nodes.retier_owner(session, user_id, lambda credit, docker: tier_label(credit, docker, t))


def set_credit(db: Database, settings: Settings, username: str, value: int, reason: str) -> tuple[int, int]:
    """Operator command: set ``username``'s credit to ``value``, recorded with ``reason``. (old, new)."""
    if not 0 <= value <= 1000:
        raise InvalidArgument("credit must be between 0 and 1000")
    if not reason.strip():
        raise InvalidArgument("a reason is required")

    def work(session: Session) -> tuple[int, int]:
        user = find_user(session, username)
        if user is None:
            raise NotFound(f"no user named {username!r}")
        old = user.credit_score
        change_credit(session, user.id, value - old, f"set by operator: {reason}", settings)
        return old, value

    return db.transaction(work)


def credit_completions(session: Session, settings: Settings, credits: dict[int, list[str]], now: datetime) -> None:
    """In the caller's transaction: :func:`change_credit` by +CREDIT_FOR_COMPLETION once per
    completed task in ``credits`` ({owner id: task ids}), with a fixed number of statements; the
    owners' nodes re-tiered."""
    change = settings.CREDIT_FOR_COMPLETION
    if not credits or change == 0:
        return
    users = session.execute(
        select(User.id, User.credit_score).where(User.id.in_(list(credits))).order_by(User.id).with_for_update()
    ).all()
    events, scores = [], {}
    for user_id, credit in users:
        for task_id in credits[user_id]:
            credit = credit_after(credit, change)
            events.append(
                {
                    "user_id": user_id,
                    "at": now,
                    "change": change,
                    "credit_after": credit,
                    "reason": f"completed task {task_id}",
                }
            )
        scores[user_id] = credit
    if not scores:
        return
    bulk.update_rows(session, User, [{"id": user_id, "credit_score": credit} for user_id, credit in scores.items()])
    bulk.insert_rows(session, CreditEvent, events)
    t = thresholds(settings)
    retiered = [
        {"id": pk, "tier": tier, "changed_at": now}
        for pk, owner_id, docker, current in session.execute(
            select(Node.id, Node.owner_id, Node.docker_status, Node.tier).where(Node.owner_id.in_(list(scores)))
        ).all()
        if (tier := tier_label(scores[owner_id], docker, t)) != current
    ]
    if retiered:
        bulk.update_rows(session, Node, retiered)

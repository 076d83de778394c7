"""Credit (trust) changes: by outcomes and by operators. Tiers of the user's nodes follow at once."""

from __future__ import annotations

from sqlalchemy.orm import Session

from models import nodes
from models.accounts import find_user
from models.db import Database
from models.errors import InvalidArgument, NotFound
from orchestration import economy
from orchestration.nodes import thresholds, tier_label
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

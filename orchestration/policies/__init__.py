"""Pure scheduling policies: trust tiers, matching a task to a node, and a candidate index.

Nothing here touches a database, a queue or the network; callers pass in state, settings and
randomness.
"""

from orchestration.policies.index import CandidateIndex, load_bin
from orchestration.policies.matching import (
    NodeView,
    Rejection,
    Resources,
    TaskNeeds,
    check,
    choose,
    eligible,
    explain_pending,
    gpu_matches,
    location_matches,
    rank_key,
    wants_any,
)
from orchestration.policies.trust import Tier, TrustThresholds, clamp_credit, node_tier, normalize_docker_status

__all__ = [
    "CandidateIndex",
    "NodeView",
    "Rejection",
    "Resources",
    "TaskNeeds",
    "Tier",
    "TrustThresholds",
    "check",
    "choose",
    "clamp_credit",
    "eligible",
    "explain_pending",
    "gpu_matches",
    "load_bin",
    "location_matches",
    "node_tier",
    "normalize_docker_status",
    "rank_key",
    "wants_any",
]

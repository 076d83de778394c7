"""Trust tiers, eligibility and Docker status, as tables."""

from __future__ import annotations

import pytest

from orchestration.policies import Tier, TrustThresholds, clamp_credit, eligible, node_tier, normalize_docker_status

T = TrustThresholds()


@pytest.mark.parametrize(
    ("credit", "docker", "tier"),
    [
        (49, "enabled", Tier.LOW),
        (50, "enabled", Tier.NORMAL),
        (99, "enabled", Tier.NORMAL),
        (100, "enabled", Tier.HIGH),
        (49, "available", Tier.LOW),
        (50, "available", Tier.NORMAL),
        (99, "available", Tier.NORMAL),
        (100, "available", Tier.HIGH),
        (49, "disabled", Tier.LOW),
        (50, "disabled", Tier.LOW),
        (99, "disabled", Tier.LOW),
        (100, "disabled", Tier.LOW),
        (49, "unavailable", Tier.LOW),
        (50, "unavailable", Tier.LOW),
        (99, "unavailable", Tier.LOW),
        (100, "unavailable", Tier.LOW),
        (0, "enabled", Tier.LOW),
        (1000, "enabled", Tier.HIGH),
        (1000, "", Tier.LOW),
    ],
)
def test_tier_follows_credit_and_docker(credit: int, docker: str, tier: Tier) -> None:
    assert node_tier(credit, normalize_docker_status(docker) == "enabled", T) is tier


@pytest.mark.parametrize(
    ("credit", "tier"),
    [(199, Tier.NORMAL), (200, Tier.HIGH), (19, Tier.LOW), (20, Tier.NORMAL)],
)
def test_thresholds_are_settings(credit: int, tier: Tier) -> None:
    assert node_tier(credit, True, TrustThresholds(high=200, normal=20)) is tier


@pytest.mark.parametrize(
    ("tier", "submitter_credit", "allowed"),
    [
        (Tier.LOW, 99, False),
        (Tier.LOW, 100, True),
        (Tier.LOW, 0, False),
        (Tier.LOW, 1000, True),
        (Tier.NORMAL, 0, True),
        (Tier.NORMAL, 99, True),
        (Tier.NORMAL, 100, True),
        (Tier.HIGH, 0, True),
        (Tier.HIGH, 99, True),
        (Tier.HIGH, 100, True),
    ],
)
def test_low_tier_nodes_serve_only_trusted_submitters(tier: Tier, submitter_credit: int, allowed: bool) -> None:
    assert eligible(tier, submitter_credit, T) is allowed


def test_low_tier_submitter_threshold_is_a_setting() -> None:
    strict = TrustThresholds(low_tier_min_submitter_credit=300)
    assert not eligible(Tier.LOW, 299, strict)
    assert eligible(Tier.LOW, 300, strict)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("enabled", "enabled"),
        ("disabled", "disabled"),
        ("available", "enabled"),
        ("unavailable", "disabled"),
        ("  Enabled\n", "enabled"),
        ("DISABLED", "disabled"),
        ("Available", "enabled"),
        (" UNAVAILABLE ", "disabled"),
        ("true", "enabled"),
        ("False", "disabled"),
        ("yes", "enabled"),
        ("NO", "disabled"),
        ("on", "enabled"),
        ("Off", "disabled"),
        ("1", "enabled"),
        ("0", "disabled"),
        ("", "disabled"),
        ("   ", "disabled"),
    ],
)
def test_docker_status_is_normalised(raw: str, status: str) -> None:
    assert normalize_docker_status(raw) == status


@pytest.mark.parametrize("raw", ["maybe", "enable", "2", "docker", "en abled", "-1"])
def test_unknown_docker_status_is_refused_with_the_value(raw: str) -> None:
    with pytest.raises(ValueError, match="unknown Docker status") as error:
        normalize_docker_status(raw)
    assert repr(raw) in str(error.value)


@pytest.mark.parametrize(("value", "clamped"), [(-5, 0), (0, 0), (1, 1), (500, 500), (1000, 1000), (1001, 1000)])
def test_credit_is_clamped(value: int, clamped: int) -> None:
    assert clamp_credit(value) == clamped


def test_tiers_sort_most_trusted_first_and_have_labels() -> None:
    assert sorted([Tier.LOW, Tier.HIGH, Tier.NORMAL]) == [Tier.HIGH, Tier.NORMAL, Tier.LOW]
    assert [tier.label for tier in Tier] == ["high", "normal", "low"]

"""NODE_ADDRESS_POLICY as a table: which targets the pool may dial."""

from __future__ import annotations

import pytest

from orchestration.policies.addresses import check_target, valid_hostname


def fixed(mapping: dict[str, list[str]]):
    def resolve(host: str) -> list[str]:
        if host not in mapping:
            raise OSError("name not known")
        return mapping[host]

    return resolve


DNS = fixed(
    {
        "worker.example": ["93.184.216.34"],
        "sneaky.example": ["93.184.216.34", "10.0.0.5"],
        "internal.example": ["192.168.1.20"],
        "8.8.8.8": ["8.8.8.8"],
        "127.0.0.1": ["127.0.0.1"],
        "10.0.0.1": ["10.0.0.1"],
        "169.254.169.254": ["169.254.169.254"],
        "::1": ["::1"],
        "fe80::1": ["fe80::1"],
        "224.0.0.5": ["224.0.0.5"],
        "0.0.0.0": ["0.0.0.0"],
        "2001:4860:4860::8888": ["2001:4860:4860::8888"],
        "::ffff:10.0.0.1": ["::ffff:10.0.0.1"],
        "self.example": ["198.51.100.7"],
    }
)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("worker.example", True),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("internal.example", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("224.0.0.5", False),
        ("0.0.0.0", False),
        ("::ffff:10.0.0.1", False),
        ("sneaky.example", False),
        ("unknown.example", False),
        ("self.example", False),
    ],
)
def test_public_policy(host: str, allowed: bool) -> None:
    reason = check_target(host, "public", DNS, own=frozenset({"198.51.100.7"}))
    assert (reason is None) is allowed, reason


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1", "localhost", "unknown.example"])
def test_any_policy_allows_every_valid_host(host: str) -> None:
    assert check_target(host, "any", DNS) is None


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("a", True),
        ("worker-1.lan", True),
        ("::1", True),
        ("1.2.3.4", True),
        ("", False),
        ("a b", False),
        ("-bad.example", False),
        ("a..b", False),
        ("x" * 254, False),
        ("l" * 64 + ".com", False),
        ("under_score", False),
    ],
)
def test_hostname_syntax(host: str, valid: bool) -> None:
    assert valid_hostname(host) is valid

"""Which addresses the pool may dial. Pure: name resolution is passed in.

``any`` (default, one machine) allows every address. ``public`` refuses loopback, private,
link-local, multicast, reserved and unspecified addresses and the pool's own, so a node cannot
point the pool's dispatch calls at the pool's own network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

Resolver = Callable[[str], Iterable[str]]

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def valid_hostname(host: str) -> bool:
    """An IP literal or a DNS name (RFC 1123 labels, ≤ 253 characters)."""
    if not host or len(host) > 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return all(_LABEL.fullmatch(label) for label in host.rstrip(".").split("."))


def forbidden_reason(address: str, own: frozenset[str]) -> str | None:
    """Why the pool must not dial ``address`` under the ``public`` policy, or None."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip  # judged by the IPv4 address it carries, if any
    checks = [
        (ip.is_loopback, "a loopback address"),
        (ip.is_private, "a private address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_reserved, "a reserved address"),
        (str(ip) in own, "one of the pool's own addresses"),
        (not ip.is_global, "not a globally routable address"),  # e.g. 100.64.0.0/10, shared (CGNAT, VPN meshes)
    ]
    return next((why for bad, why in checks if bad), None)


def check_target(host: str, policy: str, resolve: Resolver, own: frozenset[str] = frozenset()) -> str | None:
    """None when the pool may dial ``host``; otherwise a reason a person can act on.

    Every address the name resolves to must pass (a name with one public and one private address
    is refused), and an unresolvable name is refused under ``public``.
    """
    if not valid_hostname(host):
        return f"{host!r} is not a valid hostname or IP address"
    if policy == "any":
        return None
    try:
        addresses = list(resolve(host))
    except OSError as error:
        return f"{host!r} does not resolve ({error})"
    if not addresses:
        return f"{host!r} does not resolve"
    for address in addresses:
        reason = forbidden_reason(address, own)
        if reason:
            return f"{host} resolves to {address}, {reason}; this pool only dispatches to public addresses"
    return None

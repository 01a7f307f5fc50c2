"""Which model hosts a pod may name, decided at admission without any network call.

The agent checks every address a host resolves to; the webhook cannot resolve names (no
network call at admission), so it refuses what is visibly local: ``localhost`` and literal
loopback, link-local, private, shared or unspecified addresses, unless the admin allowed
the host with ``--allow-host`` (same syntax as the agent's: ``name``, ``name:port``,
``*.domain``, an IP or a CIDR).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from common.reference import Reference, split_host_port

#: schemes whose ``host`` is a network host the init container or agent will connect to
NETWORK_SCHEMES = {"http": 80, "https": 443, "oci": 443, "model-registry": 443}

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, cloud-internal


def refused_host(ref: Reference, allow_hosts: Iterable[str]) -> str | None:
    """Why the reference's host is refused, or None if it may be used."""
    default_port = NETWORK_SCHEMES.get(ref.scheme)
    if default_port is None or not ref.host:
        return None
    name, port = split_host_port(ref.host, default_port)
    why = _local_kind(name)
    if why is None:
        return None
    if any(_matches(entry, name, port) for entry in allow_hosts):
        return None
    return f"host {ref.host} is {why} and not in the webhook's --allow-host list"


def _local_kind(name: str) -> str | None:
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "localhost"
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_private or (isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED):
        return "a private address"
    if addr.is_multicast or addr.is_reserved:
        return "a reserved address"
    return None


def _matches(entry: str, name: str, port: int) -> bool:
    entry = entry.strip().lower()
    if not entry:
        return False
    name = name.lower().rstrip(".")
    if "/" in entry:
        try:
            return ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    if entry.count(":") > 1 and not entry.startswith("["):
        entry_name, entry_port = entry, -1  # a bare IPv6 address
    else:
        entry_name, entry_port = split_host_port(entry, -1)
    if entry_port not in (-1, port):
        return False
    entry_name = entry_name.rstrip(".")
    if entry_name.startswith("*."):
        return name.endswith(entry_name[1:])
    try:
        return ipaddress.ip_address(entry_name) == ipaddress.ip_address(name)
    except ValueError:
        return entry_name == name

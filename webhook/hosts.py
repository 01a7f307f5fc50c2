"""Which model hosts a pod may name, decided at admission without any network call.

The agent checks every address a host resolves to; the webhook cannot resolve names (no
network call at admission), so it refuses what is visibly local: ``localhost`` and literal
loopback, link-local, private, shared, unspecified, multicast or reserved addresses, unless
the admin allowed the host with ``--allow-host``. The syntax and the address classes are the
agent's own (``common/hosts.py``): ``name``, ``name:port``, ``*.domain``, an IP or a CIDR.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.hosts import AllowList, a, host_kind
from common.reference import Reference, split_host_port

#: schemes whose ``host`` is a network host the init container or agent will connect to
NETWORK_SCHEMES = {"http": 80, "https": 443, "oci": 443, "model-registry": 443}


def refused_host(ref: Reference, allow_hosts: Iterable[str]) -> str | None:
    """Why the reference's host is refused, or None if it may be used."""
    default_port = NETWORK_SCHEMES.get(ref.scheme)
    if default_port is None or not ref.host:
        return None
    name, port = split_host_port(ref.host, default_port)
    kind = host_kind(name)
    if kind is None or AllowList(allow_hosts).host_listed(name, port):
        return None
    what = "localhost" if kind == "localhost" else f"{a(kind)} address"
    return f"host {ref.host} is {what} and not in the webhook's --allow-host list"

"""Which hosts a source may name: the ``--allow-host HOST[:PORT]`` syntax and the addresses
that are not public, one rule for both programs.

An entry is a host name (``mirror.corp``), a name and port (``registry.corp:5000``), a
pattern of subdomains (``*.corp.example``), an address (``10.0.0.5``, ``[::1]``), an address
and port (``127.0.0.1:9000``, ``[::1]:9000``) or a network (``10.20.0.0/16``). Names match
without regard to case or a trailing dot; an entry without a port matches every port; an
address or network without a port also matches an address a name resolves to.

Not public (:func:`address_kind`): loopback, link-local (cloud metadata), unspecified,
multicast, private, shared (carrier-grade NAT, 100.64.0.0/10) and reserved addresses, and
anything else not globally routable; an IPv4-mapped IPv6 address is judged as its IPv4
address. The agent applies it to every address a host resolves to; the webhook, which
resolves nothing at admission, to the host as written (:func:`host_kind`, which also knows
``localhost`` by name).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from common.errors import InvalidInput
from common.reference import ipv4_literal, split_host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SHARED = ipaddress.ip_network("100.64.0.0/10")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class AllowedHost:
    """One ``--allow-host`` entry: a network (any port), or a name, ``*.`` pattern or
    address (canonical) with an optional port."""

    name: str = ""
    port: int | None = None
    network: IPNetwork | None = None

    def matches(self, host: str, port: int) -> bool:
        """Whether a host as written (a name or an address) and its port match the entry."""
        if self.network is not None:
            address = literal(host)
            return address is not None and address in self.network
        if self.port is not None and self.port != port:
            return False
        address = literal(host)
        if address is not None:
            return self.name == str(address)
        host = host.lower().rstrip(".")
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name


def parse_allowed(entry: str) -> AllowedHost:
    """One entry of the syntax; :class:`InvalidInput` naming it if it is none of its forms."""
    text = entry.strip().lower()
    problem = f"allow-host entry {entry!r}"
    if not text:
        raise InvalidInput(f"{problem} is empty")
    if "/" in text:
        try:
            return AllowedHost(network=ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise InvalidInput(f"{problem} is not a network: {e}") from None
    bare = literal(text.strip("[]")) if text.startswith("[") == text.endswith("]") else None
    if bare is not None:
        return AllowedHost(network=ipaddress.ip_network(bare))
    name, port = split_host_port(text, -1)
    if port != -1 and not 0 < port < 65536:
        raise InvalidInput(f"{problem}: port {port} is out of range")
    address = literal(name)
    if address is not None:
        return AllowedHost(name=str(address), port=None if port == -1 else port)
    name = name.rstrip(".")
    if len(name) > 253 or not _NAME.match(name):
        raise InvalidInput(f"{problem} is not HOST[:PORT] (a host name, *.domain, an address "
                           "or a network)")
    return AllowedHost(name=name, port=None if port == -1 else port)


class AllowList:
    """The admin's ``--allow-host`` entries, parsed once."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(parse_allowed(e) for e in entries)

    def host_listed(self, host: str, port: int) -> bool:
        """Whether the host as written (a name, or an address) and its port are listed."""
        return any(e.matches(host, port) for e in self.entries)

    def address_listed(self, address: IPAddress) -> bool:
        """Whether an address (one a name resolved to) is in a listed address or network."""
        address = unmap(address)
        return any(e.network is not None and address in e.network for e in self.entries)


def literal(host: str) -> IPAddress | None:
    """The address a host names literally (IPv4-mapped IPv6 as IPv4; an IPv4 address in any
    of its number forms, :func:`common.reference.ipv4_literal`), or None for a name."""
    text = host.split("%", 1)[0]
    try:
        if ":" not in text:  # IPv6 is written one way only
            text = ipv4_literal(text) or text
        return unmap(ipaddress.ip_address(text))
    except ValueError:
        return None


def unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_kind(address: IPAddress) -> str | None:
    """What an address is when it is not public (``loopback``, ``link-local``, ...), or None
    for a public one."""
    address = unmap(address)
    for kind, test in (
        ("loopback", address.is_loopback), ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified), ("multicast", address.is_multicast),
        ("shared", isinstance(address, ipaddress.IPv4Address) and address in SHARED),
        ("private", address.is_private), ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    ):
        if test:
            return kind
    return None


def host_kind(host: str) -> str | None:
    """What a host as written is when it is visibly not public: ``localhost`` (the name or a
    subdomain of it) or the kind of a literal address; None for any other name."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "localhost"
    address = literal(name)
    return address_kind(address) if address is not None else None


def a(kind: str) -> str:
    """The kind with its article: ``a loopback``, ``an unspecified``."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"

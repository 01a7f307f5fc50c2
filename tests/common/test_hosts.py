"""The ``--allow-host`` syntax and the address classes, shared by the agent (every address a
host resolves to) and the webhook (the host as written, at admission)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.egress import Egress
from agent.settings import EgressSettings
from common.errors import InvalidInput, InvalidReference, NotAllowed
from common.hosts import AllowedHost, AllowList, address_kind, host_kind, parse_allowed
from common.reference import ipv4_literal, parse
from webhook.hosts import refused_host


@pytest.mark.parametrize(("entry", "parsed"), [
    ("mirror.corp", AllowedHost(name="mirror.corp")),
    (" Mirror.Corp. ", AllowedHost(name="mirror.corp")),
    ("registry.corp:5000", AllowedHost(name="registry.corp", port=5000)),
    ("*.corp.example", AllowedHost(name="*.corp.example")),
    ("*.corp.example:443", AllowedHost(name="*.corp.example", port=443)),
    ("10.0.0.5", AllowedHost(network=ipaddress.ip_network("10.0.0.5/32"))),
    ("[::1]", AllowedHost(network=ipaddress.ip_network("::1/128"))),
    ("::1", AllowedHost(network=ipaddress.ip_network("::1/128"))),
    ("127.0.0.1:9000", AllowedHost(name="127.0.0.1", port=9000)),
    ("[0:0::1]:9000", AllowedHost(name="::1", port=9000)),
    ("[::ffff:10.0.0.1]:80", AllowedHost(name="10.0.0.1", port=80)),
    ("10.20.0.0/16", AllowedHost(network=ipaddress.ip_network("10.20.0.0/16"))),
    ("10.20.1.1/16", AllowedHost(network=ipaddress.ip_network("10.20.0.0/16"))),
    ("fd00::/8", AllowedHost(network=ipaddress.ip_network("fd00::/8"))),
])
def test_every_form_of_an_entry(entry: str, parsed: AllowedHost) -> None:
    assert parse_allowed(entry) == parsed


@pytest.mark.parametrize(("entry", "says"), [
    ("", "is empty"),
    ("  ", "is empty"),
    ("mirror corp", "is not HOST[:PORT]"),
    ("mirror.corp:http", "is not HOST[:PORT]"),
    ("mirror.corp:0", "port 0 is out of range"),
    ("mirror.corp:70000", "port 70000 is out of range"),
    ("https://mirror.corp", "is not a network"),
    ("10.0.0.0/33", "is not a network"),
    ("*", "is not HOST[:PORT]"),
    ("a.*.corp", "is not HOST[:PORT]"),
    ("-bad.corp", "is not HOST[:PORT]"),
])
def test_what_is_not_an_entry_is_refused_naming_it(entry: str, says: str) -> None:
    with pytest.raises(InvalidInput, match="allow-host entry") as info:
        parse_allowed(entry)
    assert says in str(info.value) and repr(entry) in str(info.value)


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "shared"), ("10.1.2.3", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("4000::1", "reserved"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_host_kind_knows_localhost_by_name_and_nothing_else_of_names() -> None:
    assert host_kind("localhost") == host_kind("App.LocalHost.") == "localhost"
    assert host_kind("localhost.example.com") is None
    assert host_kind("mirror.corp") is None
    assert host_kind("10.0.0.1") == "private"


addresses = st.ip_addresses()


@given(address=addresses)
def test_public_means_globally_routable_unicast(address: ipaddress.IPv4Address
                                               | ipaddress.IPv6Address) -> None:
    plain = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        plain = address.ipv4_mapped
    public = plain.is_global and not plain.is_multicast and not plain.is_reserved
    assert (address_kind(address) is None) is public


@pytest.mark.slow
@given(address=addresses, port=st.integers(1, 65535),
       entries=st.lists(st.sampled_from([
           "10.0.0.0/8", "127.0.0.1", "[::1]", "::1", "127.0.0.1:9000", "[::1]:9000",
           "fd00::/8", "169.254.169.254", "localhost", "*.corp", "100.64.0.0/10",
           "192.168.0.0/16", "0.0.0.0/0"]), max_size=4))
def test_the_agent_and_the_webhook_judge_a_literal_address_alike(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, entries: list[str]
) -> None:
    """For a URL naming an address, the webhook refuses it at admission exactly when the
    agent would refuse to connect to it: one syntax, one set of address classes."""
    host = f"[{address}]" if address.version == 6 else str(address)
    egress = Egress(EgressSettings(allow_hosts=tuple(entries)))
    try:
        egress.check_address(str(address), port, str(address))
        agent_refuses = False
    except NotAllowed:
        agent_refuses = True
    webhook_refuses = refused_host(parse(f"http://{host}:{port}/m.bin"), entries) is not None
    assert webhook_refuses is agent_refuses


def test_an_allow_list_reads_each_entry_once() -> None:
    allowed = AllowList(["mirror.corp:8080", "10.0.0.0/8"])
    assert allowed.host_listed("MIRROR.corp.", 8080) and not allowed.host_listed("mirror.corp", 80)
    assert allowed.host_listed("10.1.1.1", 443)  # a literal address inside a listed network
    assert not allowed.host_listed("mirror.other", 8080)
    assert allowed.address_listed(ipaddress.ip_address("::ffff:10.2.3.4"))
    assert not allowed.address_listed(ipaddress.ip_address("11.0.0.1"))


@pytest.mark.parametrize("written", ["2130706433", "0x7f.1", "127.1", "0177.0.0.1",
                                     "0x7f000001", "127.0.1", "0x7F.0.0.1.", "017700000001"])
def test_every_number_form_of_loopback_is_loopback(written: str) -> None:
    """What curl, browsers and inet_aton read as 127.0.0.1 is 127.0.0.1 to the grammar, so
    the webhook (which resolves nothing) refuses it, and the key is the address's."""
    ref = parse(f"http://{written}:8080/m.bin")
    assert ref.host == "127.0.0.1:8080"
    assert ref.key == parse("http://127.0.0.1:8080/m.bin").key
    assert host_kind(written) == "loopback"
    assert refused_host(ref, ()) is not None
    assert refused_host(ref, ("127.0.0.1",)) is None  # the admin may still allow it
    assert refused_host(parse(f"oci://{written}:5000/org/model:1"), ()) is not None


@pytest.mark.parametrize("written", ["1.2.3.4.5", "10.0.0.256", "host.123", "0x1g.1",
                                     "08.0.0.1", "4294967296"])
def test_a_host_that_ends_in_a_number_but_is_no_address_is_refused(written: str) -> None:
    with pytest.raises(InvalidReference, match="ends in a number"):
        parse(f"https://{written}/m.bin")


def test_names_are_not_numbers() -> None:
    assert ipv4_literal("models.example") is None and ipv4_literal("a1.b2c") is None
    assert parse("https://hub.example/m.bin").host == "hub.example"
    assert parse_allowed("127.1") == AllowedHost(network=ipaddress.ip_network("127.0.0.1/32"))

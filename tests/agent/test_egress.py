"""The egress policy: addresses, hosts, paths, schemes, and redirects against real servers."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from agent.egress import (
    CREDENTIAL_HEADERS,
    Egress,
    server_says,
    status_error,
    strip_credentials,
)
from agent.settings import EgressSettings
from common.errors import (
    NotAllowed,
    SourceAuthError,
    SourceError,
    SourceNotFound,
    TransientError,
)


def egress(*allow: str, only: bool = False, paths: tuple[Path, ...] = ()) -> Egress:
    return Egress(EgressSettings(allow_hosts=allow, only_allowed_hosts=only, allow_paths=paths))


# --- addresses -------------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "a loopback"),
    ("127.1.2.3", "a loopback"),
    ("::1", "a loopback"),
    ("169.254.169.254", "a link-local"),  # cloud metadata
    ("fe80::1", "a link-local"),
    ("10.1.2.3", "a private"),
    ("172.16.0.1", "a private"),
    ("192.168.1.1", "a private"),
    ("fc00::1", "a private"),
    ("100.64.0.1", "a shared"),  # carrier-grade NAT
    ("240.0.0.1", "a private"),  # reserved (Python counts 240/4 as private)
    ("4000::1", "a reserved"),  # not global unicast: refused as the webhook refuses it
    ("0.0.0.0", "an unspecified"),
    ("224.0.0.1", "a multicast"),
    ("::ffff:127.0.0.1", "a loopback"),  # IPv4-mapped IPv6
    ("::ffff:169.254.169.254", "a link-local"),
    ("::ffff:10.0.0.1", "a private"),
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_public_addresses_are_refused_by_default(address: str, kind: str) -> None:
    with pytest.raises(NotAllowed) as info:
        egress().check_address("mirror.example", 8080, address)
    message = str(info.value)
    assert f"resolves to {kind} address" in message
    assert "--allow-host mirror.example:8080" in message


def test_public_addresses_are_allowed_by_default() -> None:
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        egress().check_address("example.com", 443, address)


@pytest.mark.parametrize(("allow", "host", "port", "address"), [
    ("mirror.local", "mirror.local", 443, "10.0.0.5"),
    ("mirror.local", "MIRROR.local.", 8080, "10.0.0.5"),  # any port, case, trailing dot
    ("mirror.local:8080", "mirror.local", 8080, "10.0.0.5"),
    ("*.corp.example", "hub.corp.example", 443, "192.168.1.10"),
    ("*.corp.example", "a.b.corp.example", 443, "192.168.1.10"),
    ("10.0.0.5", "anything", 443, "10.0.0.5"),
    ("10.0.0.0/8", "anything", 443, "10.200.1.1"),
    ("127.0.0.1", "localhost", 9000, "::ffff:127.0.0.1"),
    ("[::1]", "localhost", 9000, "::1"),
    ("fd00::/8", "v6.mirror", 443, "fd12::1"),
    ("[::1]:9000", "::1", 9000, "::1"),
    ("127.0.0.1:9000", "127.0.0.1", 9000, "127.0.0.1"),
])
def test_listed_hosts_are_allowed(allow: str, host: str, port: int, address: str) -> None:
    egress(allow).check_address(host, port, address)


@pytest.mark.parametrize(("allow", "host", "port", "address"), [
    ("mirror.local:8080", "mirror.local", 8081, "10.0.0.5"),
    ("*.corp.example", "corp.example", 443, "192.168.1.10"),
    ("*.corp.example", "evilcorp.example", 443, "192.168.1.10"),
    ("mirror.local", "mirror.local.evil", 443, "10.0.0.5"),
    ("10.0.0.5", "anything", 443, "10.0.0.6"),
    ("10.0.0.0/8", "anything", 443, "169.254.169.254"),
    ("127.0.0.1:9000", "127.0.0.1", 9001, "127.0.0.1"),
])
def test_what_is_not_listed_stays_refused(allow: str, host: str, port: int,
                                          address: str) -> None:
    with pytest.raises(NotAllowed, match="--allow-host"):
        egress(allow).check_address(host, port, address)


def test_only_allowed_hosts_refuses_every_unlisted_host() -> None:
    strict = egress("hub.corp.example", "10.0.0.0/8", only=True)
    with pytest.raises(NotAllowed, match="not in the agent's allowlist"):
        strict.check_url("https://huggingface.co/api/models")
    with pytest.raises(NotAllowed, match="not in the agent's allowlist"):
        strict.check_address("huggingface.co", 443, "8.8.8.8")
    assert strict.check_url("https://hub.corp.example/x") == ("https", "hub.corp.example", 443)
    assert strict.check_url("http://10.1.1.1:8080/x") == ("http", "10.1.1.1", 8080)
    strict.check_address("hub.corp.example", 443, "10.9.9.9")
    with pytest.raises(NotAllowed):
        strict.check_url("http://11.1.1.1/x")


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://host/x", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("http://user:pw@host/x", "embedded credentials"),
    ("http:///x", "no host"),
    ("http://host:99999/x", "invalid port"),
])
def test_check_url_refuses_malformed_urls(url: str, says: str) -> None:
    with pytest.raises(NotAllowed, match=says):
        egress().check_url(url)


def test_check_url_fills_in_default_ports() -> None:
    assert egress().check_url("HTTPS://Host/x") == ("https", "host", 443)
    assert egress().check_url("http://host/x") == ("http", "host", 80)


async def test_resolve_checks_literal_addresses_and_names() -> None:
    with pytest.raises(NotAllowed, match="loopback"):
        await egress().resolve("127.0.0.1", 80)
    with pytest.raises(NotAllowed, match="loopback"):
        await egress().resolve("localhost", 80)  # the name resolves to loopback
    assert await egress("localhost").resolve("localhost", 80)
    assert await egress("127.0.0.1").resolve("127.0.0.1", 80) == ["127.0.0.1"]


def test_check_scheme() -> None:
    e = Egress(EgressSettings(allow_schemes=("hf", "https")))
    e.check_scheme("hf")
    for scheme in ("file", "s3", "http"):
        with pytest.raises(NotAllowed, match=f"{scheme}:// is not allowed"):
            e.check_scheme(scheme)


# --- paths -----------------------------------------------------------------------------------


def test_file_sources_are_off_without_allow_path(tmp_path: Path) -> None:
    with pytest.raises(NotAllowed, match="--allow-path"):
        egress().check_path(str(tmp_path))


def test_check_path_keeps_file_sources_under_their_roots(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    (seeds / "llama").mkdir(parents=True)
    (tmp_path / "seeds-evil").mkdir()
    (tmp_path / "secret").mkdir()
    (seeds / "escape").symlink_to(tmp_path / "secret")
    (seeds / "alias").symlink_to(seeds / "llama")
    e = egress(paths=(seeds,))
    assert e.check_path(str(seeds / "llama")) == seeds / "llama"
    assert e.check_path(str(seeds)) == seeds
    assert e.check_path(str(seeds / "alias")) == seeds / "llama"  # resolved, still inside
    for outside in (tmp_path / "seeds-evil", seeds / ".." / "secret", seeds / "escape",
                    seeds / "escape" / "x", Path("/etc")):
        with pytest.raises(NotAllowed, match="not under a directory allowed by --allow-path"):
            e.check_path(str(outside))


def test_allowed_roots_are_resolved_too(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    e = egress(paths=(tmp_path / "link",))
    assert e.check_path(str(real / "m")) == real / "m"


# --- headers and statuses --------------------------------------------------------------------


def test_strip_credentials() -> None:
    headers = {"Authorization": "Bearer t", "COOKIE": "c", "proxy-authorization": "p",
               "X-Amz-Security-Token": "s", "User-Agent": "modelcache", "Range": "bytes=0-"}
    stripped = strip_credentials(headers)
    assert stripped == {"User-Agent": "modelcache", "Range": "bytes=0-"}
    assert headers["Authorization"] == "Bearer t"  # the caller's mapping is untouched
    assert all(h == h.lower() for h in CREDENTIAL_HEADERS)


def test_status_errors() -> None:
    assert isinstance(status_error(401, "u"), SourceAuthError)
    assert isinstance(status_error(403, "u"), SourceAuthError)
    assert isinstance(status_error(404, "u"), SourceNotFound)
    assert isinstance(status_error(410, "u"), SourceNotFound)
    assert isinstance(status_error(400, "u"), SourceError)
    busy = status_error(503, "u", "7")
    assert isinstance(busy, TransientError) and busy.retry_after == 7.0
    assert isinstance(status_error(429, "u"), TransientError)
    late = status_error(503, "u", "Wed, 21 Oct 2015 07:28:00 GMT")
    assert isinstance(late, TransientError) and late.retry_after == 0.0


@pytest.mark.parametrize(("header", "body", "says"), [
    ("Repository not found", b'{"error": "other"}', "Repository not found"),  # the Hub's
    (None, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}',
     "MANIFEST_UNKNOWN: manifest unknown"),  # an OCI registry
    (None, b'{"error": "no such model"}', "no such model"),
    (None, b'{"code": 5, "message": "version not found"}', "version not found"),
    (None, b'{"error": {"message": "nested"}}', "nested"),
    (None, b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied"
           b"</Message></Error>", "Access Denied"),  # S3
    (None, b"<html>502 Bad Gateway</html>", None),
    (None, b'{"errors": []}', None),
    (None, b"[1, 2]", None),
    (None, b"{not json", None),
    ("line one\r\nline\x1btwo   three", None, "line one line two three"),
    ("x" * 500, None, "x" * 200),
])
def test_server_says_quotes_the_servers_own_reason(header: str | None, body: bytes | None,
                                                    says: str | None) -> None:
    assert server_says(header, body) == says


def test_server_says_never_repeats_a_credential_we_sent() -> None:
    sent = {"Authorization": "Bearer hf_abcdef123456", "User-Agent": "modelcache/0.1"}
    said = server_says("token hf_abcdef123456 is not allowed (modelcache/0.1)", None, sent)
    assert said == "token [redacted] is not allowed (modelcache/0.1)"
    error = status_error(403, "https://hub/x", detail=said)
    assert str(error).endswith("check the credentials (the server says: token [redacted] is "
                               "not allowed (modelcache/0.1))")


@pytest.mark.parametrize(("retry_after", "ratelimit", "wait"), [
    (None, '"api";r=0;t=55', 55.0),  # Hugging Face's 429
    (None, '"api";r=0;t=55, "resolvers";r=900;t=240', 55.0),  # only the exhausted window
    (None, '"a";r=0;t=10, "b";r=0;t=70', 70.0),  # both exhausted: the later reset
    (None, '"api";t=30', 30.0),  # no remaining count: the window it names
    ("120", '"api";r=0;t=55', 120.0),  # Retry-After asks longer
    ("5", '"api";r=0;t=55', 55.0),
    (None, '"api";r=3;t=55', None),  # not exhausted: nothing asked
    (None, "garbage;;t=x, =;", None),
    (None, '"api";r=0;t=99999999', None),  # an absurd reset is ignored
])
def test_a_429_waits_for_its_ratelimit_window(retry_after: str | None, ratelimit: str,
                                              wait: float | None) -> None:
    error = status_error(429, "https://hub/api/models/o/m", retry_after, ratelimit)
    assert isinstance(error, TransientError) and error.retry_after == wait
    if wait:
        assert f"rate limited: it asks to wait {wait:g} s" in str(error)
    busy = status_error(503, "u", None, '"api";r=0;t=55')
    assert isinstance(busy, TransientError) and busy.retry_after is None, "429s only"


# --- redirects against real servers on 127.0.0.1 ---------------------------------------------


@dataclass
class Servers:
    a: str
    b: str
    tls: str
    port_a: int
    port_b: int
    client_tls: ssl.SSLContext
    hits: list[str] = field(default_factory=list)


def _app(name: str, hits: list[str], others: dict[str, str]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        hits.append(f"{name}{request.path}")
        return web.json_response({"server": name, "method": request.method,
                                  "authorization": request.headers.get("Authorization"),
                                  "cookie": request.headers.get("Cookie")})

    def redirect(status: int, target: str) -> web.RouteDef:
        async def handler(request: web.Request) -> web.Response:
            hits.append(f"{name}{request.path}")
            location = target.format(**others)
            return web.Response(status=status, headers={"Location": location})
        return handler  # type: ignore[return-value]

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/same", redirect(302, "/echo"))  # type: ignore[arg-type]
    app.router.add_route("*", "/relative", redirect(307, "sub/../echo"))  # type: ignore[arg-type]
    app.router.add_route("*", "/other", redirect(302, "{b}/echo"))  # type: ignore[arg-type]
    app.router.add_route("*", "/other-back", redirect(301, "{b}/back"))  # type: ignore[arg-type]
    app.router.add_route("*", "/back", redirect(308, "{a}/echo"))  # type: ignore[arg-type]
    app.router.add_route("*", "/metadata", redirect(  # type: ignore[arg-type]
        302, "http://169.254.169.254/latest/meta-data/"))
    app.router.add_route("*", "/see-other", redirect(303, "/echo"))  # type: ignore[arg-type]
    app.router.add_route("*", "/loop", redirect(302, "/loop"))  # type: ignore[arg-type]
    app.router.add_route("*", "/nowhere", redirect(302, ""))  # type: ignore[arg-type]
    app.router.add_route("*", "/down", redirect(302, "{a}/echo"))  # type: ignore[arg-type]
    return app


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    hits: list[str] = []
    others: dict[str, str] = {}
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    runners = []
    ports = {}
    for name, tls in (("a", None), ("b", None), ("tls", server_tls)):
        runner = web.AppRunner(_app(name, hits, others), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        runners.append(runner)
        ports[name] = runner.addresses[0][1]
    others.update(a=f"http://127.0.0.1:{ports['a']}", b=f"http://127.0.0.1:{ports['b']}")
    try:
        yield Servers(others["a"], others["b"], f"https://127.0.0.1:{ports['tls']}", ports["a"],
                      ports["b"], client_tls, hits)
    finally:
        for runner in runners:
            await runner.cleanup()


async def _get(e: Egress, url: str, method: str = "GET", **kwargs: object) -> dict[str, str]:
    async with e.session() as session:
        resp = await e.request(session, method, url,
                               headers={"Authorization": "Bearer s3cr3t", "Cookie": "c=1"},
                               **kwargs)  # type: ignore[arg-type]
        async with resp:
            assert resp.status == 200
            body: dict[str, str] = await resp.json()
            return body


async def test_a_same_host_redirect_keeps_credentials(servers: Servers) -> None:
    e = egress("127.0.0.1")
    body = await _get(e, f"{servers.a}/same")
    assert body == {"server": "a", "method": "GET", "authorization": "Bearer s3cr3t",
                    "cookie": "c=1"}
    body = await _get(e, f"{servers.a}/relative", method="POST")
    assert (body["method"], body["authorization"]) == ("POST", "Bearer s3cr3t")  # 307 keeps it


async def test_a_redirect_to_another_host_drops_credentials(servers: Servers) -> None:
    e = egress("127.0.0.1")
    body = await _get(e, f"{servers.a}/other")
    assert body["server"] == "b"
    assert body["authorization"] is None and body["cookie"] is None
    # once dropped, they stay dropped even when the chain comes back
    body = await _get(e, f"{servers.a}/other-back")
    assert body["server"] == "a" and body["authorization"] is None
    assert servers.hits[-3:] == ["a/other-back", "b/back", "a/echo"]


async def test_303_turns_into_get(servers: Servers) -> None:
    body = await _get(egress("127.0.0.1"), f"{servers.a}/see-other", method="POST")
    assert body["method"] == "GET"


async def test_a_redirect_to_cloud_metadata_is_refused(servers: Servers) -> None:
    with pytest.raises(NotAllowed, match=r"169\.254\.169\.254.*link-local"):
        await _get(egress("127.0.0.1"), f"{servers.a}/metadata")
    assert servers.hits == ["a/metadata"]


async def test_a_redirect_to_an_unlisted_loopback_port_is_refused(servers: Servers) -> None:
    e = egress(f"127.0.0.1:{servers.port_a}")
    with pytest.raises(NotAllowed, match=f"--allow-host 127.0.0.1:{servers.port_b}"):
        await _get(e, f"{servers.a}/other")
    assert servers.hits == ["a/other"]  # server b was never contacted


async def test_a_refused_first_hop_sends_nothing(servers: Servers) -> None:
    with pytest.raises(NotAllowed, match="loopback"):
        await _get(egress(), f"{servers.a}/echo")
    assert servers.hits == []


async def test_https_never_downgrades_to_http(servers: Servers) -> None:
    e = egress("127.0.0.1")
    body = await _get(e, f"{servers.tls}/same", ssl=servers.client_tls)
    assert body["server"] == "tls"
    with pytest.raises(NotAllowed, match="downgrades https to http"):
        await _get(e, f"{servers.tls}/down", ssl=servers.client_tls)
    assert "a/echo" not in servers.hits


async def test_too_many_redirects(servers: Servers) -> None:
    e = egress("127.0.0.1")
    async with e.session() as session:
        with pytest.raises(SourceError, match=r"too many redirects \(more than 3\)"):
            await e.request(session, "GET", f"{servers.a}/loop", max_redirects=3)
    assert servers.hits == ["a/loop"] * 4


async def test_a_redirect_without_location(servers: Servers) -> None:
    e = egress("127.0.0.1")
    async with e.session() as session:
        with pytest.raises(SourceError, match="has no Location"):
            await e.request(session, "GET", f"{servers.a}/nowhere")


async def test_the_session_resolver_applies_the_policy(servers: Servers) -> None:
    # even a request made without Egress.request cannot reach a refused address by name
    e = egress()
    async with e.session() as session:
        with pytest.raises(NotAllowed, match=r"localhost.*loopback"):
            await session.get(f"http://localhost:{servers.port_a}/echo")
    assert servers.hits == []
    allowed = egress("localhost")
    async with allowed.session() as session, \
            session.get(f"http://localhost:{servers.port_a}/echo") as resp:
        assert resp.status == 200


async def test_a_refused_connection_is_transient() -> None:
    with socket.socket() as sock:  # a port on which nothing listens any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = egress("127.0.0.1")
    async with e.session() as session:
        with pytest.raises(TransientError, match=f"GET http://127.0.0.1:{port}/x") as info:
            await e.request(session, "GET", f"http://127.0.0.1:{port}/x?token=s3cr3t")
    assert "s3cr3t" not in str(info.value)  # the query of a presigned URL is not shown

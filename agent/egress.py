"""The egress policy: which sources the agent may reach, checked on every hop.

- schemes: only those the admin allows;
- hosts: any public host, plus the hosts the admin lists (``--allow-host``, parsed by
  ``common/hosts.py`` as the webhook parses it); loopback, link-local (cloud metadata),
  private, CGNAT, multicast and reserved addresses are refused unless their host or address
  is listed (the webhook's rule, ``common.hosts.address_kind``); with ``only_allowed_hosts``
  every unlisted host is refused;
- redirects follow one rule on every HTTP path (:meth:`Egress.redirect`: the control plane's
  :meth:`Egress.request` and the fetch engine's data plane): every hop is checked again,
  ``https`` never downgrades, and credentials are dropped when a hop changes host and stay
  dropped for the rest of the chain;
- addresses are checked after DNS resolution and the connection goes to the checked address
  (no second lookup that a rebinding DNS server could answer differently);
- ``file://`` reads only under the admin's ``--allow-path`` directories, after resolving
  symlinks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from agent.settings import EgressSettings
from common.errors import (
    ModelcacheError,
    NotAllowed,
    SourceAuthError,
    SourceError,
    SourceNotFound,
    TLSUntrusted,
    TransientError,
)
from common.hosts import AllowList, IPAddress, a, address_kind, unmap

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
#: headers that carry credentials: dropped when a redirect changes host
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization", "x-amz-security-token")


@dataclass(frozen=True)
class Endpoint:
    """A checked network endpoint: where a connection may go."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def authority(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


@dataclass(frozen=True)
class Hop:
    """One request of a redirect chain: where it goes, with which headers, after how many
    redirects. The first is ``Hop(url, headers)``; :meth:`Egress.redirect` makes the next."""

    url: str
    headers: Mapping[str, str]
    redirects: int = 0


class Egress:
    """Applies :class:`EgressSettings` to URLs, addresses and paths."""

    def __init__(self, settings: EgressSettings) -> None:
        self.settings = settings
        self.allowed = AllowList(settings.allow_hosts)
        """The admin's ``--allow-host`` entries (``common/hosts.py``, the webhook's syntax)."""
        self._paths = tuple(Path(p).resolve() for p in settings.allow_paths)
        self.tls = tls_context(settings.ca_file)
        """The one TLS context of every connection to a source (control and data)."""

    # --- checks --------------------------------------------------------------------------

    def check_scheme(self, scheme: str) -> None:
        if scheme not in self.settings.allow_schemes:
            raise NotAllowed(f"source scheme {scheme}:// is not allowed on this agent")

    def host_listed(self, host: str, port: int) -> bool:
        """Whether the admin listed this host as written (by name, by name and port, by
        pattern, or a literal address by address or network)."""
        return self.allowed.host_listed(host, port)

    def address_listed(self, ip: IPAddress) -> bool:
        """Whether the admin listed an address a host resolved to (an address or network)."""
        return self.allowed.address_listed(ip)

    def check_address(self, host: str, port: int, address: str) -> None:
        """Refuse an address that is not public unless its host or address is listed."""
        ip = unmap(ipaddress.ip_address(address.split("%", 1)[0]))
        if self.host_listed(host, port) or self.address_listed(ip):
            return
        if self.settings.only_allowed_hosts:
            raise NotAllowed(f"host {host}:{port} is not in the agent's allowlist")
        kind = address_kind(ip)
        if kind is not None:
            raise NotAllowed(
                f"host {host}:{port} resolves to {a(kind)} address {ip}; "
                f"allow it with --allow-host {host}:{port} if it is a trusted mirror"
            )

    def check_url(self, url: str) -> tuple[str, str, int]:
        """Check a URL's scheme and syntax; return (scheme, host, port). No DNS here."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise NotAllowed(f"URL scheme {scheme!r} is not allowed for downloads")
        if parts.username or parts.password:
            raise NotAllowed("URLs with embedded credentials are refused")
        host = (parts.hostname or "").lower()
        if not host:
            raise NotAllowed("URL has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as e:
            raise NotAllowed(f"URL has an invalid port: {e}") from e
        if self.settings.only_allowed_hosts and not self.host_listed(host, port):
            raise NotAllowed(f"host {host}:{port} is not in the agent's allowlist")
        return scheme, host, port

    async def endpoint(self, url: str) -> Endpoint:
        """Check a URL and resolve its host to addresses the policy allows."""
        scheme, host, port = self.check_url(url)
        addresses = await self.resolve(host, port)
        return Endpoint(scheme, host, port, tuple(addresses))

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and return the allowed addresses; raise if none is allowed."""
        try:
            ipaddress.ip_address(host)
            infos: list[Any] = [(0, 0, 0, "", (host, port))]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise TransientError(f"cannot resolve host {host}: {e.strerror}") from e
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            self.check_address(host, port, address)  # any refused address refuses the host
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise SourceError(f"host {host} has no address")
        return addresses

    def check_path(self, path: str) -> Path:
        """Resolve a ``file://`` path and require it under an allowed directory."""
        if not self._paths:
            raise NotAllowed(
                "file:// sources are disabled on this agent; the admin enables them with "
                "--allow-path DIR"
            )
        real = Path(path).resolve()
        for root in self._paths:
            if real == root or root in real.parents:
                return real
        raise NotAllowed(f"path {path} is not under a directory allowed by --allow-path")

    # --- HTTP (control plane) ------------------------------------------------------------

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session whose DNS answers pass through this policy."""
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(self), limit=64,
                                         ttl_dns_cache=30, ssl=self.tls)
        timeout = kwargs.pop("timeout", aiohttp.ClientTimeout(total=None, sock_connect=15,
                                                              sock_read=60))
        return aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False, **kwargs)

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_redirects: int = MAX_REDIRECTS,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        """Send a request, following redirects by hand under :meth:`redirect`, each hop's
        addresses checked before it connects.

        The caller owns the returned response (``async with`` or ``release()``).
        """
        hop = Hop(url, dict(headers or {}))
        while True:
            _, host, port = self.check_url(hop.url)
            await self.resolve(host, port)
            try:
                resp = await session.request(method, hop.url, headers=dict(hop.headers),
                                             allow_redirects=False, **kwargs)
            except NotAllowed:
                raise
            except aiohttp.ClientConnectorCertificateError as e:
                raise untrusted(hop.url, e.certificate_error) from e
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise TransientError(
                    f"{method} {shown_url(hop.url)}: {describe_error(e)}") from e
            if resp.status not in REDIRECTS:
                return resp
            location = resp.headers.get("Location")
            resp.release()
            hop = self.redirect(hop, location, max_redirects)
            if resp.status == 303:
                method = "GET"

    # --- redirects (every HTTP path) -----------------------------------------------------

    def redirect(self, hop: Hop, location: str | None,
                 max_redirects: int = MAX_REDIRECTS) -> Hop:
        """The next hop after ``hop`` was answered with a redirect to ``location``: the one
        redirect rule of the agent, for the control plane (:meth:`request`) and the data
        plane (the fetch engine) alike.

        - a redirect without a ``Location``, or past ``max_redirects``, is an error;
        - ``https`` never downgrades: a hop after an https one is https too;
        - the target is checked like a first URL (:meth:`check_url`: scheme, syntax, the
          allowlist); its addresses are checked when it connects (:meth:`resolve`), so
          every hop passes the whole policy;
        - credentials (:data:`CREDENTIAL_HEADERS`) are dropped when the target's host
          (and port) differs from the previous hop's, and stay dropped for the rest of
          the chain: a chain that comes back to an earlier host does not get them back.
        """
        if not location:
            raise SourceError(f"redirect from {shown_url(hop.url)} has no Location")
        if hop.redirects >= max_redirects:
            raise SourceError(
                f"too many redirects (more than {max_redirects}) from {shown_url(hop.url)}")
        target = urljoin(hop.url, location)
        old, new = urlsplit(hop.url), urlsplit(target)
        if old.scheme.lower() == "https" and new.scheme.lower() != "https":
            raise NotAllowed(f"redirect from {shown_url(hop.url)} downgrades https to "
                             f"{new.scheme.lower() or 'no scheme'}")
        self.check_url(target)
        headers = hop.headers
        if new.netloc.lower() != old.netloc.lower():
            headers = strip_credentials(headers)
        return Hop(target, headers, hop.redirects + 1)


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that refuses DNS answers the policy does not allow."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            self._egress.check_address(host, port, r["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The system's trust, plus the admin's CA bundle if given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def untrusted(url: str, error: BaseException) -> TLSUntrusted:
    """The error for a certificate the agent does not trust: not retried, and it says what
    to do about a private CA."""
    reason = getattr(error, "verify_message", None) or describe_error(error)
    return TLSUntrusted(
        f"{shown_url(url)}: the server's TLS certificate is not trusted ({reason}); if a "
        "private CA signed it, give the agent that CA (caFile in the config, or --ca-file)")


def strip_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers without anything that carries credentials."""
    return {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}


def shown_url(url: str) -> str:
    """A URL for messages: no query (presigned URLs carry signatures there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def describe_error(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]


def status_error(status: int, url: str, retry_after: str | None = None,
                 ratelimit: str | None = None, detail: str | None = None) -> ModelcacheError:
    """The error for an HTTP status from a source, with the wait the server asked for: its
    ``Retry-After``, or for a 429 the reset of its exhausted ``RateLimit`` window (the IETF
    draft's header, which Hugging Face sends: ``"api";r=0;t=55``), whichever is longer; and
    the server's own explanation (:func:`server_says`), quoted at the end."""
    says = f" (the server says: {detail})" if detail else ""
    if status in (401, 403):
        return SourceAuthError(f"{url}: access denied ({status}); check the credentials{says}")
    if status == 404 or status == 410:
        return SourceNotFound(f"{url}: not found ({status}){says}")
    if status == 429 or status >= 500 or status == 408:
        wait = _retry_after(retry_after)
        reset = _ratelimit_reset(ratelimit) if status == 429 else None
        if reset is not None:
            wait = max(wait or 0.0, reset)
        asked = f" (rate limited: it asks to wait {wait:g} s)" if wait else ""
        return TransientError(f"{url}: server answered {status}{asked}{says}", wait)
    return SourceError(f"{url}: unexpected HTTP status {status}{says}")


#: the most of a server's explanation an error message quotes
DETAIL_MAX = 200
_XML_MESSAGE = re.compile(rb"<Message>([^<]{1,2000})</Message>")


def server_says(header: str | None, body: bytes | None,
                sent: Mapping[str, str] | None = None) -> str | None:
    """A server's own short explanation of an error reply: Hugging Face's ``X-Error-Message``
    header (a gated repo says what to do), else the body's: an OCI registry's
    ``errors[0]`` code and message, a REST API's ``error`` or ``message``, S3's XML
    ``<Message>``. Printable characters only, cut to :data:`DETAIL_MAX`, and every
    credential we sent (``sent``'s credential headers) redacted, should the server echo one."""
    text = header or _body_message(body)
    if not text:
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    for name, value in (sent or {}).items():
        if name.lower() in CREDENTIAL_HEADERS:
            for part in value.split():
                if len(part) >= 8:
                    text = text.replace(part, "[redacted]")
    return text[:DETAIL_MAX] or None


def _body_message(body: bytes | None) -> str | None:
    if not body:
        return None
    body = body[:64 * 1024]
    if body.lstrip()[:1] != b"{":
        found = _XML_MESSAGE.search(body)
        return found.group(1).decode(errors="replace") if found else None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    errors = doc.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        parts = [errors[0].get("code"), errors[0].get("message")]
        return ": ".join(p for p in parts if isinstance(p, str) and p) or None
    for key in ("error", "message"):
        value = doc.get(key)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value:
            return value
    return None



def _ratelimit_reset(value: str | None) -> float | None:
    """Seconds until the exhausted window of a ``RateLimit`` header resets (the longest, if
    several are; an item without ``r`` counts as exhausted), or None."""
    if not value:
        return None
    resets: list[float] = []
    for item in value.split(","):
        params = dict(p.strip().partition("=")[::2] for p in item.split(";")[1:])
        try:
            remaining = int(params["r"]) if "r" in params else 0
            reset = float(params["t"])
        except (KeyError, ValueError):
            continue
        if remaining <= 0 and 0 <= reset < 86400:
            resets.append(reset)
    return max(resets) if resets else None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None

"""Loopback plumbing shared by the test servers: free ports, readiness polling, TLS."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0).

    Another process may take it before the caller binds it: starters retry on
    "address in use" instead of trusting it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    alive: Callable[[], bool] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy; return that.

    ``alive`` is checked on every round so a server that died while we wait fails fast.
    Exceptions from the probe count as "not yet". The interval grows to 0.25 s.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process exited")
        try:
            result = probe()
        except Exception as e:  # any failure means "not ready yet"
            last_error = e
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s (last error: {last_error!r})")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


def http_status(
    host: str,
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> int:
    """Status of one request (0 if the connection failed): for readiness probes."""
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def answers(
    host: str, port: int, path: str, tls: ssl.SSLContext | None, statuses: tuple[int, ...]
) -> bool:
    """Whether ``path`` answers one of ``statuses`` now (a readiness probe)."""
    return http_status(host, port, path, tls=tls) in statuses


def tls_client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context trusting only ``ca_pem`` (a test CA from trustme)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return ctx


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One HTTP(S) request with the standard library; errors are replies, not raises.

    Redirects are not followed: a test sees the 3xx itself.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}), data=data)  # noqa: S310
    opener = urllib.request.build_opener(
        _NoRedirect, urllib.request.HTTPSHandler(context=tls), urllib.request.ProxyHandler({})
    )
    try:
        with opener.open(req, timeout=timeout) as r:
            return Reply(r.status, _headers(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, _headers(e.headers), e.read())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Headers(dict[str, str]):
    """Case-insensitive lookups over the first value of each header."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


def _headers(msg: Any) -> _Headers:
    out = _Headers()
    for k, v in msg.items():
        out.setdefault(k.lower(), v)
    return out

"""An HTTP file server with programmable faults, and the byte-serving engine it shares.

Serves in-memory or on-disk files with ``Range`` (206 / 416), ``If-Range``, ``ETag`` and
``Last-Modified``. Each path can be given faults, consumed one per request in order (a
"503 storm" is five queued 503s), or a sticky fault for every request:

- ``status`` (503, 429, 500, ...) with ``retry_after``;
- ``reset_after`` / ``close_after``: send N body bytes then reset (RST) or close (FIN) the
  connection; the latter is a short body (``Content-Length`` larger than what was sent);
- ``wrong_content_range``: answer a range with a ``Content-Range`` that lies;
- ``ignore_range``: answer 200 with the whole body to a ranged request;
- ``rate`` (bytes/s per response), ``link`` (a :class:`Link`: one cap shared by every
  response given it, a saturated uplink), ``stall_after`` + ``stall_for``, ``delay``;
- ``hold``: a ``threading.Event`` the response waits for (before the headers, or at
  ``stall_after`` bytes), so a test controls exactly when a download proceeds;
- ``redirect`` to any URL; ``corrupt_at`` flips one byte of the body.

Every request is recorded (:class:`Served`: method, path, host, range asked, bytes actually
written, the ``Authorization`` it carried) so tests can assert "exactly one download per
file" or "bytes already on disk were not fetched again". With ``reset_after`` the peer's
kernel may drop bytes it had not read yet; use ``close_after`` where resume offsets must
be exact.

``FaultyServer`` is thread-safe: tests configure it from their own thread while an
:class:`~tests.servers.aioserver.AppThread` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

from tests.servers.aioserver import AppThread
from tests.servers.net import LOOPBACK, wait_until

CHUNK = 64 * 1024
HOLD_TIMEOUT = 60.0
_FIXED_MTIME = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


class Link:
    """A rate shared by every response whose fault carries it: more connections get no
    more bytes per second in all (an uplink or a server that is the bottleneck). A
    fault's ``rate`` is a link of each response's own, started with the response."""

    def __init__(self, rate: int, began: float | None = None) -> None:
        self.rate = rate
        self._sent = 0
        self._began = began

    async def pace(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the rate (the server's one event loop
        calls this: no lock is needed)."""
        if self._began is None:
            self._began = time.monotonic()
        ahead = self._sent / self.rate - (time.monotonic() - self._began)
        self._sent += n
        if ahead > 0:
            await asyncio.sleep(ahead)


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of (or while) serving it normally."""

    status: int | None = None
    """Answer this status with a short text body instead of the file."""
    retry_after: float | str | None = None
    """``Retry-After`` value sent with ``status`` (seconds or an HTTP date)."""
    redirect: str | None = None
    """Answer ``redirect_status`` with this ``Location`` (absolute or relative)."""
    redirect_status: int = 302
    delay: float = 0.0
    """Seconds to wait before the status line."""
    reset_after: int | None = None
    """Write this many body bytes, then reset the connection (RST)."""
    close_after: int | None = None
    """Write this many body bytes, then close the connection (FIN): a short body."""
    wrong_content_range: int = 0
    """Shift the start advertised in ``Content-Range`` by this many bytes (the bytes sent
    are those of the true range)."""
    ignore_range: bool = False
    """Answer 200 with the whole file to a ranged request."""
    rate: int | None = None
    """Throttle the body to this many bytes per second."""
    link: Link | None = None
    """Throttle the body, with every other response given the same link, to its rate."""
    stall_after: int | None = None
    """Pause for ``stall_for`` seconds after this many body bytes."""
    stall_for: float = 0.0
    hold: threading.Event | None = None
    """Wait (up to ``HOLD_TIMEOUT``) until this is set: at ``stall_after`` bytes if given,
    else before the status line."""
    corrupt_at: int | None = None
    """Flip the byte at this file offset, if it is sent."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra response headers (e.g. ``RateLimit`` with a 429)."""
    methods: tuple[str, ...] = ("GET", "HEAD")
    """Request methods this fault applies to (others pass it by)."""


@dataclass(frozen=True)
class Resource:
    """A file to serve: bytes in memory or a path on disk."""

    data: bytes | None = None
    file: Path | None = None
    etag: str | None = None
    """Quoted ETag; default: a strong tag from the content."""
    last_modified: float = _FIXED_MTIME
    content_type: str = "application/octet-stream"
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.file is not None
        return self.file.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + length]
        assert self.file is not None
        with self.file.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    @property
    def http_last_modified(self) -> str:
        return formatdate(self.last_modified, usegmt=True)


def make_resource(
    content: bytes | Path,
    *,
    etag: str | None = None,
    last_modified: float = _FIXED_MTIME,
    content_type: str = "application/octet-stream",
    extra_headers: Mapping[str, str] | None = None,
) -> Resource:
    """A :class:`Resource` with a content-derived ETag unless one is given."""
    if isinstance(content, Path):
        res = Resource(file=content, last_modified=last_modified, content_type=content_type)
        tag = etag or f'"{res.size:x}-{int(content.stat().st_mtime_ns):x}"'
    else:
        res = Resource(data=content, last_modified=last_modified, content_type=content_type)
        tag = etag or f'"{hashlib.sha256(content).hexdigest()[:32]}"'
    return replace(res, etag=tag, extra_headers=dict(extra_headers or {}))


@dataclass
class Served:
    """One request as the server saw and answered it."""

    method: str
    path: str
    host: str
    status: int = 0
    range: str | None = None
    """The ``Range`` header as sent."""
    start: int = 0
    end: int = 0
    """The byte span ``[start, end)`` of the file the response was for."""
    sent: int = 0
    """Body bytes actually written before the response ended or was cut."""
    authorization: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    fault: Fault | None = None
    began: float = field(default_factory=time.monotonic)
    ended: float | None = None
    """When the response was done with (``time.monotonic``); None while it runs."""


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, None to serve the whole file.

    Multiple ranges and unknown units are answered with the whole file (allowed by
    RFC 9110); an unsatisfiable range raises :class:`RangeNotSatisfiable`.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable
            return max(0, size - n), size
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        return None
    if start >= size or end <= start:
        raise RangeNotSatisfiable
    return start, end


async def _wait(event: threading.Event) -> None:
    """Wait for a thread-side event without tying up an executor thread."""
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def respond(
    request: web.Request,
    resource: Resource,
    record: Served,
    *,
    fault: Fault | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Answer ``request`` with ``resource`` (ranges, validators, faults); fill ``record``."""
    record.fault = fault
    if fault is not None and request.method not in fault.methods:
        fault = None
    if fault is not None and fault.delay:
        await asyncio.sleep(fault.delay)
    if fault is not None and fault.hold is not None and fault.stall_after is None:
        await _wait(fault.hold)
    base = {
        "Accept-Ranges": "bytes",
        "Last-Modified": resource.http_last_modified,
        **({"ETag": resource.etag} if resource.etag else {}),
        **resource.extra_headers,
        **(headers or {}),
        **(fault.headers if fault is not None else {}),
    }
    if fault is not None and fault.status is not None:
        extra = dict(fault.headers)
        if fault.retry_after is not None:
            extra["Retry-After"] = str(fault.retry_after)
        record.status = fault.status
        return web.Response(status=fault.status, text=f"injected {fault.status}\n", headers=extra)
    if fault is not None and fault.redirect is not None:
        record.status = fault.redirect_status
        return web.Response(
            status=fault.redirect_status,
            headers={**(headers or {}), **fault.headers, "Location": fault.redirect},
        )

    size = resource.size
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and resource.etag and resource.etag in if_none_match:
        record.status = 304
        return web.Response(status=304, headers=base)
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if if_range and if_range not in (resource.etag, resource.http_last_modified):
        range_header = None  # the client's partial copy is stale: send everything
    if fault is not None and fault.ignore_range:
        range_header = None
    try:
        span = parse_range(range_header, size)
    except RangeNotSatisfiable:
        record.status = 416
        return web.Response(status=416, headers={**base, "Content-Range": f"bytes */{size}"})
    start, end = span if span is not None else (0, size)
    record.start, record.end = start, end
    status = 206 if span is not None else 200
    out = dict(base)
    out["Content-Type"] = resource.content_type
    out["Content-Length"] = str(end - start)
    if span is not None:
        shift = fault.wrong_content_range if fault is not None else 0
        out["Content-Range"] = f"bytes {start + shift}-{end - 1 + shift}/{size}"
    record.status = status
    resp = web.StreamResponse(status=status, headers=out)
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    await _write_body(request, resp, resource, start, end, record, fault)
    return resp


async def _write_body(
    request: web.Request,
    resp: web.StreamResponse,
    resource: Resource,
    start: int,
    end: int,
    record: Served,
    fault: Fault | None,
) -> None:
    cut = None
    cut_with = _close
    if fault is not None and fault.reset_after is not None:
        cut, cut_with = fault.reset_after, _reset
    elif fault is not None and fault.close_after is not None:
        cut = fault.close_after
    own_rate = Link(fault.rate, time.monotonic()) if fault is not None and fault.rate else None
    pos = start
    stall_at = fault.stall_after if fault is not None else None
    while pos < end:
        if cut is not None and record.sent >= cut:
            break
        if stall_at is not None and record.sent >= stall_at:
            stall_at = None
            if fault is not None and fault.hold is not None:
                await _wait(fault.hold)
            else:
                await asyncio.sleep(fault.stall_for if fault is not None else 0)
        n = min(CHUNK, end - pos)
        if cut is not None:
            n = min(n, cut - record.sent)
        if stall_at is not None:
            n = min(n, stall_at - record.sent)
        shared = fault.link if fault is not None else None
        if own_rate is not None:
            n = min(n, max(1024, own_rate.rate // 10))
        if shared is not None:
            n = min(n, max(1024, shared.rate // 20))
        for link in (own_rate, shared):
            if link is not None:
                await link.pace(n)
        if resource.file is not None:
            chunk = await asyncio.to_thread(resource.read, pos, n)
        else:
            chunk = resource.read(pos, n)
        if fault is not None and fault.corrupt_at is not None and pos <= fault.corrupt_at < pos + n:
            i = fault.corrupt_at - pos
            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
        try:
            await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            return  # the client went away
        pos += len(chunk)
        record.sent += len(chunk)
    if cut is not None and record.sent >= cut and pos < end:
        cut_with(request)


_RECORDED_HEADERS = ("If-Range", "If-None-Match", "User-Agent", "Accept-Encoding")


def new_record(request: web.Request) -> Served:
    return Served(
        method=request.method,
        path=request.path,
        host=request.host,
        range=request.headers.get("Range"),
        authorization=request.headers.get("Authorization"),
        headers={k: v for k in _RECORDED_HEADERS if (v := request.headers.get(k)) is not None},
    )


def most_at_once(records: list[Served]) -> int:
    """The most of these requests that were being answered at the same time."""
    events = sorted([(r.began, 1) for r in records] +
                    [(r.ended if r.ended is not None else float("inf"), -1) for r in records])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


class FaultyServer:
    """Files by URL path, per-path fault queues, and a log of every request."""

    def __init__(self) -> None:
        self.base_url = ""
        """Set once served, e.g. ``http://127.0.0.1:40123``."""
        self._lock = threading.Lock()
        self._files: dict[str, Resource] = {}
        self._queued: dict[str, deque[Fault]] = {}
        self._sticky: dict[str, Fault] = {}
        self._log: list[Served] = []

    def url(self, path: str = "") -> str:
        return self.base_url + _norm(path)

    # -- configuration (from the test's thread) --------------------------------------
    def add(self, path: str, content: bytes | Path, **kwargs: object) -> Resource:
        """Serve ``content`` at ``path`` (replacing what was there: a new ETag)."""
        res = make_resource(content, **kwargs)  # type: ignore[arg-type]
        with self._lock:
            self._files[_norm(path)] = res
        return res

    def add_tree(self, root: Path, prefix: str = "/") -> dict[str, Resource]:
        """Serve every regular file under ``root`` at ``prefix`` + its relative path."""
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                url_path = prefix.rstrip("/") + "/" + p.relative_to(root).as_posix()
                out[url_path] = self.add(url_path, p)
        return out

    def remove(self, path: str) -> None:
        with self._lock:
            self._files.pop(_norm(path), None)

    def fault(self, path: str, *faults: Fault, times: int = 1) -> None:
        """Queue faults for the next requests of ``path`` (each repeated ``times``)."""
        with self._lock:
            q = self._queued.setdefault(_norm(path), deque())
            for f in faults:
                q.extend([f] * times)

    def always(self, path: str, fault: Fault | None) -> None:
        """A fault for every request of ``path`` until cleared with ``None``."""
        with self._lock:
            if fault is None:
                self._sticky.pop(_norm(path), None)
            else:
                self._sticky[_norm(path)] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._queued.clear()
            self._sticky.clear()

    def pending_faults(self, path: str) -> int:
        with self._lock:
            return len(self._queued.get(_norm(path), ()))

    # -- observation -----------------------------------------------------------------
    def log(self, path: str | None = None) -> list[Served]:
        """Requests answered so far (all, or of one path), in arrival order."""
        with self._lock:
            return [r for r in self._log if path is None or r.path == _norm(path)]

    def gets(self, path: str) -> list[Served]:
        """The GET requests of ``path``."""
        return [r for r in self.log(path) if r.method == "GET"]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(r.sent for r in self.log(path))

    def spans(self, path: str) -> list[tuple[int, int]]:
        """``[start, start + sent)`` of each GET of ``path``: the file bytes it carried."""
        return [(r.start, r.start + r.sent) for r in self.gets(path) if r.status in (200, 206)]

    def bytes_sent_twice(self, path: str) -> int:
        """How many file bytes of ``path`` were written more than once (0 = no refetch)."""
        events = sorted(
            [(s, 1) for s, e in self.spans(path) if e > s]
            + [(e, -1) for s, e in self.spans(path) if e > s]
        )
        twice = depth = 0
        prev = 0
        for pos, step in events:
            if depth > 1:
                twice += (pos - prev) * (depth - 1)
            depth += step
            prev = pos
        return twice

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def wait_for(self, predicate: Callable[[FaultyServer], bool], timeout: float = 10.0) -> None:
        """Poll until ``predicate(self)`` holds, e.g. ``lambda s: s.bytes_sent(p) > 10**6``."""
        wait_until(lambda: predicate(self), timeout=timeout, interval=0.005, what="server state")

    # -- serving ---------------------------------------------------------------------
    def _next(self, path: str, method: str) -> tuple[Resource | None, Fault | None]:
        with self._lock:
            fault = self._sticky.get(path)
            q = self._queued.get(path)
            if fault is None and q and method in q[0].methods:
                fault = q.popleft()
            return self._files.get(path), fault

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = new_record(request)
        with self._lock:
            self._log.append(record)
        try:
            resource, fault = self._next(request.path, request.method)
            if resource is None:
                if fault is not None and (fault.status is not None or
                                          fault.redirect is not None):
                    return await respond(request, Resource(data=b""), record, fault=fault)
                record.status = 404
                return web.Response(status=404, text="not found\n")
            return await respond(request, resource, record, fault=fault)
        finally:
            record.ended = time.monotonic()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle, allow_head=False)
        app.router.add_head("/{tail:.*}", self.handle)
        return app


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


@contextmanager
def faulty_server(host: str = LOOPBACK, ssl_context: ssl.SSLContext | None = None
                  ) -> Iterator[FaultyServer]:
    """A :class:`FaultyServer` served from a thread (over TLS with ``ssl_context``);
    ``server.url(path)`` reaches it."""
    server = FaultyServer()
    with AppThread(server.make_app(), host=host, ssl_context=ssl_context,
                   name="faulty-http") as thread:
        server.base_url = thread.url
        yield server

"""The fetch engine's HTTP connections and receive buffers, used from its worker threads.

- :class:`ConnectionPool`: idle keep-alive connections by endpoint (scheme, host, port);
- :class:`PinnedHTTP` / :class:`PinnedHTTPS`: connections that go to the addresses the
  egress policy already checked, never to a second DNS lookup (a rebinding DNS server
  cannot answer differently), TLS verified against the source's host name;
- :class:`Attempt`: the connection of one attempt, so another thread can abort it;
- :data:`buffers`: two reusable page-aligned receive buffers per worker thread (aligned so
  that full chunks can be written O_DIRECT straight from them).

Everything here blocks; it runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import mmap
import socket
import ssl
import threading

from agent.settings import FetchSettings


class ConnectionPool:
    """Idle HTTP connections by endpoint, for the worker threads."""

    def __init__(self, settings: FetchSettings, tls: ssl.SSLContext) -> None:
        self._settings = settings
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls = tls

    def get(self, scheme: str, host: str, port: int | None, addresses: tuple[str, ...]
            ) -> http.client.HTTPConnection:
        port = port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if conn.sock is not None:
                    return conn
        s = self._settings
        if scheme == "https":
            return PinnedHTTPS(host, port, addresses, s.connect_timeout, s.read_timeout,
                               self._tls)
        return PinnedHTTP(host, port, addresses, s.connect_timeout, s.read_timeout)

    def put(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is None:
            return
        scheme = "https" if isinstance(conn, http.client.HTTPSConnection) else "http"
        key = (scheme, conn.host, conn.port)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._settings.max_connections:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


class Attempt:
    """The connection of one attempt, so that another thread can abort it."""

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None

    def abort(self) -> None:
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


def _connect(addresses: tuple[str, ...], port: int, connect_timeout: float,
             read_timeout: float) -> socket.socket:
    last: OSError | None = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=connect_timeout)
        except OSError as e:
            last = e
            continue
        sock.settimeout(read_timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.EHOSTUNREACH, "no address to connect to")


class PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address the egress policy already checked, not to a new lookup."""

    def __init__(self, host: str, port: int, addresses: tuple[str, ...], connect_timeout: float,
                 read_timeout: float) -> None:
        super().__init__(host, port, timeout=read_timeout)
        self._addresses = addresses
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.port, self._connect_timeout,
                             self._read_timeout)


class PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, addresses: tuple[str, ...], connect_timeout: float,
                 read_timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=read_timeout, context=context)
        self._addresses = addresses
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._context = context

    def connect(self) -> None:
        sock = _connect(self._addresses, self.port, self._connect_timeout, self._read_timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _Buffers(threading.local):
    """Two reusable, page-aligned receive buffers per worker thread (aligned so that
    full chunks can be written O_DIRECT straight from them)."""

    def get(self, size: int) -> tuple[memoryview, memoryview]:
        bufs: tuple[memoryview, memoryview] | None = getattr(self, "bufs", None)
        if bufs is None or len(bufs[0]) != size:
            self.bufs = bufs = (memoryview(mmap.mmap(-1, size)), memoryview(mmap.mmap(-1, size)))
        return bufs


buffers = _Buffers()


def drain(resp: http.client.HTTPResponse, limit: int = 64 * 1024) -> bytes:
    """Read a small reply body out (so the connection can be reused); return it."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        return resp.read(limit)
    return b""


__all__ = ["Attempt", "ConnectionPool", "PinnedHTTP", "PinnedHTTPS", "buffers", "drain"]

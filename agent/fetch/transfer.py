"""One attempt at one segment: a (ranged) GET over a pooled connection, its body received
into the partial download. The blocking data path of the fetch engine, run in its worker
threads.

The reply is checked before a byte is kept: a redirect is handed back to the engine
(:class:`Redirected`), an error status becomes the project's error for it, a 200 to a
ranged request that does not start at byte 0 means the server ignores ranges
(:class:`RangeIgnored`), a 206 must carry exactly the range asked for, and an ETag that
changed means the file changed at the source. The body lands through the thread's two
reusable buffers in turn (``readinto``: no new bytes object per chunk), one being received
into while the stated-digest thread may still read the other.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
from urllib.parse import urlsplit

from agent.egress import (
    REDIRECTS,
    describe_error,
    server_says,
    shown_url,
    status_error,
    untrusted,
)
from agent.fetch.pool import Attempt, ConnectionPool, buffers, drain
from agent.fetch.stats import FetchStats, ProgressFn
from agent.settings import FetchSettings
from agent.sources.base import Location, RemoteFile
from agent.store.ingest import Ingest
from agent.store.segments import Segment
from common.errors import SourceError, TransientError

USER_AGENT = "modelcache/0.1"


class RangeIgnored(SourceError):
    """The server answered a ranged request with the whole body (or other content)."""


class Redirected(Exception):
    """The server answered a redirect (``location``: its ``Location`` header, as sent; the
    engine follows it under the egress policy)."""

    def __init__(self, location: str | None) -> None:
        self.location = location


class Transfer:
    """Runs attempts (:meth:`run`) over one pool of connections."""

    def __init__(self, settings: FetchSettings, pool: ConnectionPool) -> None:
        self.settings = settings
        self._pool = pool

    def run(self, ingest: Ingest, seg: Segment, loc: Location, file: RemoteFile,
            addresses: tuple[str, ...], cancel: threading.Event, attempt: Attempt,
            progress: ProgressFn, stats: FetchStats, landed: ProgressFn) -> None:
        """GET the rest of ``seg`` from ``loc`` (connecting to ``addresses``) into
        ``ingest``; raises what the engine retries, follows or fails on. ``progress``,
        ``stats`` and ``landed`` (the stream's meter) count each buffer that lands."""
        parts = urlsplit(loc.url)
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **loc.headers}
        ranged = seg.end is not None or seg.done > 0
        if seg.end is not None:
            if seg.end == seg.start:
                return  # an empty file: nothing to fetch
            headers["Range"] = f"bytes={seg.offset}-{seg.end - 1}"
        elif seg.done > 0:
            headers["Range"] = f"bytes={seg.offset}-"
        if ranged and file.etag and not file.etag.startswith("W/"):
            headers["If-Range"] = file.etag
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = self._pool.get(parts.scheme, parts.hostname or "", parts.port, addresses)
        attempt.conn = conn
        reusable = False
        try:
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as e:
                raise untrusted(loc.url, e) from e
            except (OSError, http.client.HTTPException) as e:
                raise TransientError(f"{shown_url(loc.url)}: {describe_error(e)}") from e
            status = resp.status
            if status in REDIRECTS:
                location = resp.getheader("Location")
                drain(resp)
                reusable = resp.isclosed() and not resp.will_close
                raise Redirected(location)
            if status not in (200, 206):
                body = drain(resp)
                reusable = resp.isclosed() and not resp.will_close
                raise status_error(status, shown_url(loc.url), resp.getheader("Retry-After"),
                                   resp.getheader("RateLimit"),
                                   server_says(resp.getheader("X-Error-Message"), body, headers))
            # a 200 is the body from byte 0: usable only by a segment that starts there
            # (it reads no further than its end)
            if status == 200 and ranged and seg.offset != 0:
                raise RangeIgnored(
                    f"{shown_url(loc.url)} ignored the byte range (or changed since it was "
                    "listed); starting the file over")
            if status == 206:
                check_content_range(resp.getheader("Content-Range"), seg, loc.url)
            etag = resp.getheader("ETag")
            if file.etag and etag and etag.strip() != file.etag.strip() and \
                    not file.etag.startswith("W/"):
                raise SourceError(
                    f"{file.path} changed at the source while being pulled (ETag {etag} != "
                    f"{file.etag}); pull again to resolve the new revision")
            self._receive(resp, ingest, seg, cancel, progress, stats, landed, loc.url)
            # a stream cut short by a split still has body bytes in flight: not reusable
            reusable = resp.isclosed() and not resp.will_close
        finally:
            attempt.conn = None
            if reusable and not cancel.is_set():
                self._pool.put(conn)
            else:
                conn.close()

    def _receive(self, resp: http.client.HTTPResponse, ingest: Ingest, seg: Segment,
                 cancel: threading.Event, progress: ProgressFn, stats: FetchStats,
                 landed: ProgressFn, url: str) -> None:
        # two buffers in turn: one is received into while the sha256 thread (if the source
        # stated a sha256) still reads the other
        bufs = buffers.get(self.settings.buffer_bytes)
        pending: list[threading.Event | None] = [None, None]
        turn = 0
        every = self.settings.checkpoint_bytes
        try:
            while True:
                if cancel.is_set():
                    raise asyncio.CancelledError()
                turn ^= 1
                buf = bufs[turn]
                waiting = pending[turn]
                if waiting is not None:
                    waiting.wait()
                want = len(buf) if seg.end is None else min(len(buf), seg.end - seg.offset)
                if want == 0:
                    break
                try:
                    n = resp.readinto(buf[:want])
                except (OSError, http.client.HTTPException) as e:
                    raise TransientError(f"{shown_url(url)}: {describe_error(e)}") from e
                if not n:
                    break
                pending[turn] = ingest.write(seg, buf[:n])
                landed(n)
                stats.add(n)
                progress(n)
                ingest.maybe_checkpoint(every, self.settings.checkpoint_seconds)
        finally:
            for waiting in pending:  # the buffers are this thread's: free them first
                if waiting is not None:
                    waiting.wait()
        if seg.end is not None and not seg.complete:
            raise TransientError(
                f"{shown_url(url)}: short body, the connection ended at byte {seg.offset} of "
                f"{seg.end}")


def check_content_range(value: str | None, seg: Segment, url: str) -> None:
    """The server must send exactly the range we asked for."""
    if not value or not value.startswith("bytes "):
        raise TransientError(f"{shown_url(url)}: 206 without a valid Content-Range")
    spec = value[6:].split("/", 1)[0]
    start_s, _, end_s = spec.partition("-")
    try:
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise TransientError(f"{shown_url(url)}: malformed Content-Range {value!r}") from None
    want_end = (seg.end - 1) if seg.end is not None else None
    if start != seg.offset or (want_end is not None and end != want_end):
        raise TransientError(
            f"{shown_url(url)}: wrong Content-Range {value!r} for bytes "
            f"{seg.offset}-{'' if want_end is None else want_end}")


__all__ = ["USER_AGENT", "RangeIgnored", "Redirected", "Transfer", "check_content_range"]

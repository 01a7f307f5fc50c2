"""The fetch engine: moves a file's bytes from its source into the store, verified.

One engine serves the agent and the init container's fallback. For each file:

1. content the source already vouched for (sha256) and the store holds is not fetched;
2. concurrent requests for the same content share one download (single flight);
3. a file starts as one stream; if its stream is slow (a CDN capping each connection), the
   rest of it is fetched in pieces, in file order, over more connections at once (bounded
   across the whole process), each a ranged GET into the partial file at its offset;
4. the bytes land through reused buffers (``readinto``: no new bytes object per chunk) in
   worker threads, so the event loop never waits on the network, the disk or the hash;
5. resets, timeouts, 5xx, 429 and short bodies are retried with jittered exponential
   backoff (``Retry-After`` honoured), resuming where the segment stopped;
6. redirects are followed hop by hop under the egress policy, credentials dropped when
   the host changes; a 401/403 renews the source's location (tokens, presigned URLs) once;
7. the ingest hashes in order as bytes land and commits only after size and digest checks;
   archives are unpacked safely from the verified download.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import http.client
import logging
import mmap
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urljoin, urlsplit

import blake3

from agent.egress import (
    REDIRECTS,
    Egress,
    describe_error,
    server_says,
    shown_url,
    status_error,
    strip_credentials,
    untrusted,
)
from agent.settings import ArchiveSettings, FetchSettings
from agent.sources.base import Credentials, Location, RemoteFile, Source
from agent.sources.control import retry_level
from agent.store import archive
from agent.store.ingest import Ingest, Segment
from agent.store.local import Store
from agent.store.trees import FileEntry
from common.backoff import delay as backoff_delay
from common.errors import (
    IntegrityError,
    NotAllowed,
    SourceAuthError,
    SourceError,
    SourceNotFound,
    TransientError,
)

log = logging.getLogger(__name__)
USER_AGENT = "modelcache/0.1"
SPLIT_WINDOW_BUFFERS = 4
"""The splitter measures a file's rate over at least this many buffers per stream..."""
SPLIT_WINDOW_LOOKS = 8
"""...or over this many looks, whichever comes first."""

ProgressFn = Callable[[int], None]


class _RangeIgnored(SourceError):
    """The server answered a ranged request with the whole body (or other content)."""


class _Redirected(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


@dataclass
class FetchStats:
    """What one pull cost at the source."""

    on_download: Callable[[int], None] | None = None
    """Called (from worker threads) with every chunk of bytes received from a source."""
    bytes_downloaded: int = 0
    files_downloaded: int = 0
    files_deduplicated: int = 0
    bytes_deduplicated: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_downloaded += n
        if self.on_download is not None:
            self.on_download(n)


class Fetcher:
    """Downloads files into a :class:`Store`; one per process."""

    def __init__(self, store: Store, egress: Egress, settings: FetchSettings,
                 archive_settings: ArchiveSettings | None = None) -> None:
        self.store = store
        self.egress = egress
        self.settings = settings
        self.archive_settings = archive_settings or ArchiveSettings()
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_connections + 2, thread_name_prefix="fetch")
        self._pool = _ConnectionPool(settings, egress.tls)
        self._inflight: dict[str, asyncio.Future[list[FileEntry]]] = {}
        self._wanted = 0
        """Segments running or waiting for a connection (the splitter adds no more than
        ``max_connections`` allows)."""

    async def close(self) -> None:
        self._pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- public --------------------------------------------------------------------------

    async def fetch(self, source: Source, file: RemoteFile, credentials: Credentials | None,
                    progress: ProgressFn, stats: FetchStats) -> list[FileEntry]:
        """Fetch one remote file into the store; return the tree entries it produces
        (one, or an archive's members)."""
        found = await self._find_stated(file)
        if found is not None:
            stats.files_deduplicated += 1
            stats.bytes_deduplicated += found.size
            progress(found.size)
            return [found]
        ref = ref_id(file)
        while (running := self._inflight.get(ref)) is not None:
            try:
                entries = await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if running.cancelled() and task is not None and not task.cancelling():
                    continue  # the leader was stopped, not us: take over
                raise
            if not await asyncio.to_thread(self._hold_all, entries):
                continue  # collected since: fetch it again
            progress(sum(e.size for e in entries))
            if file.unpack:
                return entries
            return [replace(e, path=file.path) for e in entries]
        future: asyncio.Future[list[FileEntry]] = asyncio.get_running_loop().create_future()
        self._inflight[ref] = future
        try:
            entries = await self._download(source, file, credentials, ref, progress, stats)
        except Exception as e:
            future.set_exception(e)
            future.exception()  # marked retrieved: only waiters need it
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(entries)
            return entries
        finally:
            del self._inflight[ref]

    async def _find_stated(self, file: RemoteFile) -> FileEntry | None:
        """The store's blob for the digest the source stated (sha256, else git blob id),
        held for the caller; None if there is none or its size differs."""
        if file.unpack:
            return None
        found = await asyncio.to_thread(self.store.find_stated, file.sha256, file.git_oid)
        if found is None:
            return None
        if file.size is not None and found[1] != file.size:
            await asyncio.to_thread(self.store.blobs.release, [found[0]])
            return None
        return FileEntry(file.path, found[1], found[0], file.sha256,
                         None if file.sha256 else file.git_oid)

    def _hold_all(self, entries: list[FileEntry]) -> bool:
        """Hold blobs another caller fetched, for this caller; False if one is gone.
        (An image layer's whiteouts have no blob.)"""
        entries = [e for e in entries if not e.whiteout]
        for i, e in enumerate(entries):
            self.store.blobs.hold(e.blake3)
            if not self.store.blobs.exists(e.blake3):
                self.store.blobs.release(x.blake3 for x in entries[: i + 1])
                return False
        return True

    # --- one file ------------------------------------------------------------------------

    async def _download(self, source: Source, file: RemoteFile, credentials: Credentials | None,
                        ref: str, progress: ProgressFn, stats: FetchStats) -> list[FileEntry]:
        if file.url.startswith("file://"):
            return await self._copy_local(file, progress, stats)
        identity = {"url": shown_url(file.url), "size": file.size, "sha256": file.sha256,
                    "etag": file.etag, **_git_identity(file)}
        split, restarted = True, False
        while True:
            ingest = await _opened(lambda: self.store.open_ingest(ref, identity))
            try:
                entries = await self._download_into(ingest, source, file, credentials, split,
                                                    progress, stats)
            except _RangeIgnored:
                # the server sent the whole body: start over on one connection, from byte 0
                await asyncio.to_thread(ingest.discard)
                if restarted:
                    raise
                log.info("server ignores byte ranges; fetching over one connection",
                         extra={"path": file.path})
                split, restarted = False, True
                continue
            except (TransientError, SourceAuthError, asyncio.CancelledError):
                await asyncio.to_thread(ingest.close)  # worth resuming: keep the partial
                raise
            except IntegrityError as e:
                await asyncio.to_thread(ingest.discard)
                raise IntegrityError(f"{file.path}: {e}") from e
            except BaseException:
                await asyncio.to_thread(ingest.discard)  # wrong, refused or out of space
                raise
            stats.files_downloaded += 1
            return entries

    async def _download_into(self, ingest: Ingest, source: Source, file: RemoteFile,
                             credentials: Credentials | None, split: bool,
                             progress: ProgressFn, stats: FetchStats) -> list[FileEntry]:
        # One stream per file to begin with: its bytes are hashed straight from the receive
        # buffer and written O_DIRECT. The splitter adds streams only where they are slow.
        segments = await asyncio.to_thread(ingest.plan, file.size, 1,
                                           self.settings.segment_min_bytes)
        resumed = ingest.resumed_bytes
        if resumed:
            log.info("resuming partial download",
                     extra={"ref": ingest.ref, "path": file.path, "bytes_on_disk": resumed})
            progress(resumed)
        ingest.start_hasher()
        location = _SharedLocation(source, file, credentials)
        cancel = threading.Event()
        tasks: set[asyncio.Task[None]] = set()

        def launch(seg: Segment) -> None:
            tasks.add(asyncio.create_task(self._segment(ingest, seg, file, location, cancel,
                                                        progress, stats)))

        for seg in segments:
            if not seg.complete:
                launch(seg)
        splitter = asyncio.create_task(self._splitter(ingest, launch)) \
            if split and file.size is not None else None
        running = set(tasks)
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                running = {t for t in tasks if not t.done()}
        except BaseException:
            cancel.set()
            raise
        finally:
            if splitter is not None:
                splitter.cancel()
            await _settle([*tasks, *([splitter] if splitter else [])])
        if file.size is None:
            ingest.mark_complete()
        if file.unpack:
            sealed = await asyncio.to_thread(ingest.seal, file.size, file.sha256)
            entries = await asyncio.to_thread(
                archive.unpack, sealed.path, file.unpack, file.unpack_root, self.store,
                self.archive_settings)
            await asyncio.to_thread(ingest.discard)
            return entries
        git_oid = _git_identity(file).get("git_oid")
        sealed = await asyncio.to_thread(functools.partial(
            ingest.commit, self.store.blobs, file.size, file.sha256, expected_git_oid=git_oid))
        await asyncio.to_thread(self.store.note_blob, sealed.blake3, sealed.size, sealed.sha256,
                                sealed.git_oid)
        return [FileEntry(file.path, sealed.size, sealed.blake3, sealed.sha256, sealed.git_oid)]

    async def _splitter(self, ingest: Ingest, launch: Callable[[Segment], None]) -> None:
        """Give a file more connections while its streams are slow (a remote CDN or object
        store caps each connection: Hugging Face's CDN gives one stream ~40 MB/s); leave
        fast ones alone (on a fast link the extra streams would only cost a second read of
        their bytes for the ordered hash).

        The streams of a slow file double (up to ``connections_per_file`` and the
        connections free under ``max_connections``) every other look (the look after a
        split lets the new connections ramp up), so a file reaches its full width in a
        second or so. They grow again only while growing pays: if the last split did not
        raise the file's rate by at least half of what the new streams would add at the
        old per-stream rate, the link or the server is the limit, not each connection, and
        more connections would only load an overloaded server further."""
        s = self.settings
        clock = asyncio.get_running_loop().time
        mark_bytes, mark_time = ingest.received_bytes, clock()
        last_split: tuple[float, int, int] | None = None  # rate before it, streams, added
        settling = False
        while True:
            await asyncio.sleep(s.split_interval)
            active = [seg for seg in ingest.segments if not seg.complete and not seg.pooled]
            if not active:
                continue
            if settling:  # new connections ramp up (TCP slow start): judge them a look later
                mark_bytes, mark_time, settling = ingest.received_bytes, clock(), False
                continue
            # bytes become visible a whole buffer at a time: measure over a window long
            # enough to hold several buffers per stream (or, for a crawl, a few seconds)
            got, elapsed = ingest.received_bytes - mark_bytes, clock() - mark_time
            if got < SPLIT_WINDOW_BUFFERS * s.buffer_bytes * len(active) and \
                    elapsed < SPLIT_WINDOW_LOOKS * s.split_interval:
                continue
            mark_bytes, mark_time = mark_bytes + got, mark_time + elapsed
            rate = got / elapsed
            if rate / len(active) >= s.split_below_rate:
                continue
            if last_split is not None:
                before, streams, added = last_split
                if rate <= before * (1 + added / streams / 2):
                    continue  # the last split did not pay: hold
            room = min(len(active), s.connections_per_file - len(active),
                       s.max_connections - self._wanted)
            streams, added = len(active), 0
            for _ in range(max(room, 0)):
                # the new streams take pieces of the rest of the file in order; the first
                # time, the rest is pooled past one piece of the stream that has most left
                new = ingest.take_piece(s.segment_min_bytes)
                if new is None:
                    seg = max(active, key=lambda x: x.remaining or 0)
                    if ingest.pool_rest(seg, 2 * s.buffer_bytes + s.segment_min_bytes,
                                        s.segment_min_bytes):
                        new = ingest.take_piece(s.segment_min_bytes)
                if new is None:
                    break
                launch(new)
                active.append(new)
                added += 1
            if added:
                last_split, settling = (rate, streams, added), True
                log.debug("splitting a slow download", extra={
                    "ref": ingest.ref, "streams": len(active), "added": added,
                    "bytes_per_second": int(rate)})

    async def _segment(self, ingest: Ingest, seg: Segment, file: RemoteFile,
                       location: _SharedLocation, cancel: threading.Event,
                       progress: ProgressFn, stats: FetchStats) -> None:
        self._wanted += 1
        try:
            piece: Segment | None = seg
            while piece is not None:
                await self._segment_attempts(ingest, piece, file, location, cancel, progress,
                                             stats)
                # a file fetched in pieces: go on with the next one, on the same connection
                piece = ingest.take_piece(self.settings.segment_min_bytes)
        finally:
            self._wanted -= 1

    async def _segment_attempts(self, ingest: Ingest, seg: Segment, file: RemoteFile,
                                location: _SharedLocation, cancel: threading.Event,
                                progress: ProgressFn, stats: FetchStats) -> None:
        s = self.settings
        attempt = 0
        # seg.done when the location was last renewed after a 401/403: refused again with
        # no byte since, renewing does not help (a signed URL that expires mid-pull, as a
        # CDN's or a presigned S3 URL does each hour, is renewed each time)
        renewed_at: int | None = None
        while not seg.complete:
            loc = await location.get()
            before = seg.done
            try:
                endpoint = await self.egress.endpoint(loc.url)
                async with self._slots:
                    await self._in_thread(ingest, seg, loc, file, endpoint.addresses, cancel,
                                          progress, stats)
                if seg.end is None:
                    return  # a stream of unknown length ends when the server closes it
            except _Redirected as r:
                await location.redirect(loc, r.location)
                continue
            except SourceAuthError:
                if renewed_at == seg.done:
                    raise
                renewed_at = seg.done
                await location.get(refresh=True)
                continue
            except TransientError as e:
                if seg.done - before >= 1024 * 1024:
                    attempt = 0  # it made progress: a fresh budget for the next failure
                attempt += 1
                if attempt >= s.retries:
                    raise TransientError(
                        f"{file.path}: giving up after {attempt} attempts: {e}") from e
                delay = backoff_delay(attempt, s.backoff_base, s.backoff_max, e.retry_after)
                log.log(retry_level(e), "retrying segment", extra={
                    "path": file.path, "offset": seg.offset, "attempt": attempt,
                    "delay": round(delay, 3), "error": str(e)})
                await asyncio.sleep(delay)

    async def _in_thread(self, ingest: Ingest, seg: Segment, loc: Location, file: RemoteFile,
                         addresses: tuple[str, ...], cancel: threading.Event,
                         progress: ProgressFn, stats: FetchStats) -> None:
        """Run one attempt in a worker thread. If the task is cancelled, the thread is told
        to stop (and its socket shut down) and awaited: no thread outlives its ingest."""
        attempt = _Attempt()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run_segment, ingest, seg, loc, file, addresses, cancel,
            attempt, progress, stats)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            attempt.abort()
            with contextlib.suppress(BaseException):
                await future
            raise

    # --- the blocking data path (worker threads) ------------------------------------------

    def _run_segment(self, ingest: Ingest, seg: Segment, loc: Location, file: RemoteFile,
                     addresses: tuple[str, ...], cancel: threading.Event, attempt: _Attempt,
                     progress: ProgressFn, stats: FetchStats) -> None:
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
                location = resp.getheader("Location") or ""
                _drain(resp)
                reusable = resp.isclosed() and not resp.will_close
                raise _Redirected(urljoin(loc.url, location))
            if status not in (200, 206):
                body = _drain(resp)
                reusable = resp.isclosed() and not resp.will_close
                raise status_error(status, shown_url(loc.url), resp.getheader("Retry-After"),
                                   resp.getheader("RateLimit"),
                                   server_says(resp.getheader("X-Error-Message"), body, headers))
            # a 200 is the body from byte 0: usable only by a segment that starts there
            # (it reads no further than its end)
            if status == 200 and ranged and seg.offset != 0:
                raise _RangeIgnored(
                    f"{shown_url(loc.url)} ignored the byte range (or changed since it was "
                    "listed); starting the file over")
            if status == 206:
                _check_content_range(resp.getheader("Content-Range"), seg, loc.url)
            etag = resp.getheader("ETag")
            if file.etag and etag and etag.strip() != file.etag.strip() and \
                    not file.etag.startswith("W/"):
                raise SourceError(
                    f"{file.path} changed at the source while being pulled (ETag {etag} != "
                    f"{file.etag}); pull again to resolve the new revision")
            self._receive(resp, ingest, seg, cancel, progress, stats, loc.url)
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
                 url: str) -> None:
        # two buffers in turn: one is received into while the sha256 thread (if the source
        # stated a sha256) still reads the other
        bufs = _buffers.get(self.settings.buffer_bytes)
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

    # --- local files (file://, seeds) ----------------------------------------------------

    async def _copy_local(self, file: RemoteFile, progress: ProgressFn,
                          stats: FetchStats) -> list[FileEntry]:
        path = self.egress.check_path(urlsplit(file.url).path)

        def copy() -> list[FileEntry]:
            writer = self.store.blob_writer(file.sha256)
            buf = memoryview(bytearray(self.settings.buffer_bytes))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as e:
                writer.abort()
                raise SourceNotFound(f"cannot read {path}: {e.strerror}") from e
            try:
                while n := os.readv(fd, [buf]):
                    writer.write(buf[:n])
                    stats.add(n)
                    progress(n)
                sealed = writer.commit(self.store.blobs, file.size)
            except BaseException:
                writer.abort()
                raise
            finally:
                os.close(fd)
            self.store.note_blob(sealed.blake3, sealed.size, sealed.sha256)
            return [FileEntry(file.path, sealed.size, sealed.blake3, sealed.sha256)]

        entries = await asyncio.to_thread(copy)
        stats.files_downloaded += 1
        return entries


class _Attempt:
    """The connection of one attempt, so that another thread can abort it."""

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None

    def abort(self) -> None:
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


class _SharedLocation:
    """A file's current location, shared by its segments: renewed once for all after a
    401/403, and moved once for all after a redirect."""

    def __init__(self, source: Source, file: RemoteFile, credentials: Credentials | None) -> None:
        self._source = source
        self._file = file
        self._credentials = credentials
        self._loc: Location | None = None
        self._lock = asyncio.Lock()
        self._hops = 0

    async def get(self, refresh: bool = False) -> Location:
        async with self._lock:
            if self._loc is None or refresh:
                self._loc = await self._source.locate(self._file, self._credentials,
                                                      refresh=refresh)
                self._hops = 0
            return self._loc

    async def redirect(self, old: Location, target: str) -> None:
        async with self._lock:
            if self._loc is not old:
                return  # another segment already followed it
            self._hops += 1
            if self._hops > 5:
                raise SourceError(f"too many redirects from {shown_url(old.url)}")
            old_parts, new_parts = urlsplit(old.url), urlsplit(target)
            if old_parts.scheme == "https" and new_parts.scheme != "https":
                raise NotAllowed(f"redirect from {shown_url(old.url)} downgrades https")
            headers = dict(old.headers)
            if old_parts.netloc.lower() != new_parts.netloc.lower():
                headers = strip_credentials(headers)
            self._loc = Location(target, headers)


class _ConnectionPool:
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
            return _PinnedHTTPS(host, port, addresses, s.connect_timeout, s.read_timeout,
                                self._tls)
        return _PinnedHTTP(host, port, addresses, s.connect_timeout, s.read_timeout)

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


class _PinnedHTTP(http.client.HTTPConnection):
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


class _PinnedHTTPS(http.client.HTTPSConnection):
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


_buffers = _Buffers()


def _drain(resp: http.client.HTTPResponse, limit: int = 64 * 1024) -> bytes:
    """Read a small reply body out (so the connection can be reused); return it."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        return resp.read(limit)
    return b""


def _check_content_range(value: str | None, seg: Segment, url: str) -> None:
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


def _git_identity(file: RemoteFile) -> dict[str, str]:
    """The git blob id to check, when there is one and nothing stronger: it needs the size
    up front. Absent (not None) otherwise, so that partial downloads kept from before it
    existed keep their identity."""
    if file.git_oid and not file.sha256 and file.size is not None and not file.unpack:
        return {"git_oid": file.git_oid}
    return {}


def ref_id(file: RemoteFile) -> str:
    """The partial download's name: by strong digest when known, else by where it comes
    from and its change detector (a presigned URL's signature does not count)."""
    if file.sha256:
        if file.unpack:  # an archive's members, not one file: never shared with a file
            how = blake3.blake3(f"{file.unpack}\0{file.unpack_root}".encode()).hexdigest()
            return f"sha256-{file.sha256}-{how[:12]}"
        return f"sha256-{file.sha256}"
    ident = f"{shown_url(file.url)}\0{file.etag or ''}\0{file.size}\0{file.unpack or ''}"
    return "src-" + blake3.blake3(ident.encode()).hexdigest()[:40]


async def _opened(open_ingest: Callable[[], Ingest]) -> Ingest:
    """Open an ingest in a thread. If the caller is cancelled meanwhile, the thread still
    opens it: close it then, or its lock stays held by an object nobody has."""
    future = asyncio.ensure_future(asyncio.to_thread(open_ingest))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            ingest = await future
            await asyncio.to_thread(ingest.close)
        raise


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel and wait for every task (their threads stop at the next chunk)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["FetchStats", "Fetcher", "ProgressFn", "ref_id"]

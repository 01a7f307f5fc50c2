"""The fetch engine: moves a file's bytes from its source into the store, verified.

One engine serves the agent and the init container's fallback. For each file:

1. content the source already vouched for (sha256) and the store holds is not fetched;
2. concurrent requests for the same content share one download (single flight);
3. a file starts as one stream; if its stream is slow (a CDN capping each connection), the
   rest of it is fetched in pieces, in file order, over more connections at once (bounded
   across the whole process), each a ranged GET into the partial file at its offset
   (:mod:`agent.fetch.splitter`);
4. each attempt runs in a worker thread (:mod:`agent.fetch.transfer`, over the
   connections of :mod:`agent.fetch.pool`), so the event loop never waits on the network,
   the disk or the hash;
5. resets, timeouts, 5xx, 429 and short bodies are retried with jittered exponential
   backoff (``Retry-After`` honoured), resuming where the segment stopped;
6. redirects are followed hop by hop under the egress policy's one redirect rule
   (:meth:`~agent.egress.Egress.redirect`: every hop checked, no downgrade from https,
   credentials dropped once the host changes); a 401/403 renews the source's location
   (tokens, presigned URLs) once;
7. the ingest hashes in order as bytes land and commits only after size and digest checks;
   archives are unpacked safely from the verified download.

This module owns the per-file work (dedup, single flight, the segments' attempts and
retries, the shared location, local copies); the rooms named above own the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import blake3

from agent.egress import Egress, Hop, shown_url
from agent.fetch.pool import Attempt, ConnectionPool
from agent.fetch.splitter import StreamMeter, Streams, split_slow_streams
from agent.fetch.stats import FetchStats, ProgressFn
from agent.fetch.transfer import RangeIgnored, Redirected, Transfer
from agent.settings import ArchiveSettings, FetchSettings
from agent.sources.base import Credentials, Location, RemoteFile, Source
from agent.sources.control import retry_level
from agent.store import archive
from agent.store.ingest import Ingest
from agent.store.local import Store
from agent.store.segments import Segment
from agent.store.trees import FileEntry
from common.backoff import delay as backoff_delay
from common.errors import (
    IntegrityError,
    SourceAuthError,
    SourceNotFound,
    TransientError,
)

log = logging.getLogger(__name__)


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
        self._pool = ConnectionPool(settings, egress.tls)
        self._transfer = Transfer(settings, self._pool)
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
            except RangeIgnored:
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
        job = _Job(ingest, file, _SharedLocation(source, file, credentials, self.egress),
                   threading.Event(), progress, stats, Streams())
        tasks: set[asyncio.Task[None]] = set()

        def launch(seg: Segment) -> None:
            tasks.add(asyncio.create_task(self._segment(job, seg)))

        for seg in segments:
            if not seg.complete:
                launch(seg)
        splitter = None
        if tasks:
            stats.streams[file.path] = steps = [len(tasks)]
            if split and file.size is not None:
                splitter = asyncio.create_task(split_slow_streams(
                    ingest, self.settings, job.streams, launch, lambda: self._wanted,
                    steps.append))
        running = set(tasks)
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                running = {t for t in tasks if not t.done()}
        except BaseException:
            job.cancel.set()
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

    async def _segment(self, job: _Job, seg: Segment) -> None:
        """One stream of a file: its segment, then pieces of the pool while there are."""
        meter = job.streams.add()
        self._wanted += 1
        try:
            piece: Segment | None = seg
            while piece is not None:
                await self._segment_attempts(job, piece, meter)
                # a file fetched in pieces: go on with the next one, on the same connection
                piece = job.ingest.take_piece(self.settings.segment_min_bytes)
        finally:
            self._wanted -= 1
            job.streams.remove(meter)

    async def _segment_attempts(self, job: _Job, seg: Segment, meter: StreamMeter) -> None:
        s = self.settings
        file, location = job.file, job.location
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
                    await self._in_thread(job, seg, loc, endpoint.addresses, meter)
                if seg.end is None:
                    return  # a stream of unknown length ends when the server closes it
            except Redirected as r:
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

    async def _in_thread(self, job: _Job, seg: Segment, loc: Location,
                         addresses: tuple[str, ...], meter: StreamMeter) -> None:
        """Run one attempt in a worker thread. If the task is cancelled, the thread is told
        to stop (and its socket shut down) and awaited: no thread outlives its ingest."""
        attempt = Attempt()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._transfer.run, job.ingest, seg, loc, job.file, addresses,
            job.cancel, attempt, job.progress, job.stats, meter.landed)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()
            attempt.abort()
            with contextlib.suppress(BaseException):
                await future
            raise

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


@dataclass(frozen=True)
class _Job:
    """One file's download in progress: what each of its streams works with."""

    ingest: Ingest
    file: RemoteFile
    location: _SharedLocation
    cancel: threading.Event
    """Set to stop every stream's worker thread at its next chunk."""
    progress: ProgressFn
    stats: FetchStats
    streams: Streams


class _SharedLocation:
    """A file's current location, shared by its segments: renewed once for all after a
    401/403, and moved once for all after a redirect (under the egress policy's one
    redirect rule, :meth:`~agent.egress.Egress.redirect`)."""

    def __init__(self, source: Source, file: RemoteFile, credentials: Credentials | None,
                 egress: Egress) -> None:
        self._source = source
        self._file = file
        self._credentials = credentials
        self._egress = egress
        self._loc: Location | None = None
        self._hop: Hop | None = None
        self._lock = asyncio.Lock()

    async def get(self, refresh: bool = False) -> Location:
        async with self._lock:
            if self._loc is None or refresh:
                self._loc = await self._source.locate(self._file, self._credentials,
                                                      refresh=refresh)
                self._hop = Hop(self._loc.url, self._loc.headers)
            return self._loc

    async def redirect(self, old: Location, location: str | None) -> None:
        async with self._lock:
            if self._loc is not old or self._hop is None:
                return  # another segment already followed it
            self._hop = self._egress.redirect(self._hop, location)
            self._loc = Location(self._hop.url, dict(self._hop.headers))


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


__all__ = ["Fetcher", "ref_id"]

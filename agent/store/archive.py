"""Safe unpacking of archives and tar layers into the store.

Members are never written through the file system by name: each regular member's bytes
stream into a new blob (hashed while written), and the model tree is built later from
checked names as hard links to blobs. So a member can never land outside the model's
directory, and "symlink, then write through it" has nothing to write through. On top of
that the archive is refused, with a message naming the member, when it holds:

- a name that is absolute, has ``..``, NUL, control characters, or appears twice;
- a symlink, a hard link, a device, a FIFO, or a sparse or unknown member type;
- more members, more bytes, or a higher unpacked/compressed ratio than the limits allow
  (a decompression bomb is stopped while it inflates, not after).

Blocking: runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import zstandard

from agent.settings import ArchiveSettings
from agent.store.names import safe_relpath
from agent.store.roles import Ingester
from agent.store.trees import WHITEOUT, WHITEOUT_PREFIX, FileEntry
from agent.store.writer import BlobWriter
from common.errors import ArchiveRejected, UnsafeName

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
#: what the decoders raise on a damaged or cut archive
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, zipfile.BadZipFile, zstandard.ZstdError,
            gzip.BadGzipFile)


def unpack(path: Path, kind: str, root: str, store: Ingester,
           settings: ArchiveSettings) -> list[FileEntry]:
    """Unpack the archive at ``path`` into blobs; return the tree entries.

    Only members under ``root`` (e.g. ``models``) are kept, with ``root/`` stripped. Every
    member's name is checked, but links and devices outside ``root`` are skipped, not
    refused: they are never written (a modelcar's base layer holds ``bin/sh`` and
    ``dev/null``). With a ``root``, an archive with nothing under it yields nothing (an
    image layer that does not touch ``/models``); without one, it is refused.
    """
    budget = _Budget(path.stat().st_size, settings)
    entries: list[FileEntry] = []
    seen: set[str] = set()
    root = root.strip("/")
    name = ""
    with open(path, "rb") as raw:
        try:
            for name, size, reader in _members(raw, kind, budget, root):
                rel = _select(name, root)
                if rel is None or rel.rsplit("/", 1)[-1].startswith(WHITEOUT_PREFIX):
                    _skip(reader, size, budget)
                    if rel is not None:  # applied to the layers below when they are merged
                        entries.append(FileEntry(rel, 0, WHITEOUT))
                    continue
                if rel in seen:
                    raise ArchiveRejected(f"archive member {name!r} appears twice")
                seen.add(rel)
                entries.append(_ingest(store, rel, size, reader, budget))
        except _CORRUPT as e:  # raised while a member's bytes are read, outside _members
            raise ArchiveRejected(
                f"archive is corrupt or truncated (in member {name!r}): {e}") from e
    if not root and all(e.whiteout for e in entries):
        raise ArchiveRejected("archive holds no regular files")
    return entries


class _Budget:
    def __init__(self, compressed: int, settings: ArchiveSettings) -> None:
        self.compressed = max(compressed, 1)
        self.settings = settings
        self.members = 0
        self.total = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.settings.max_members:
            raise ArchiveRejected(
                f"archive has more than {self.settings.max_members} members (at {name!r})")

    def grow(self, n: int, name: str) -> None:
        self.total += n
        if self.total > self.settings.max_bytes:
            raise ArchiveRejected(
                f"archive unpacks to more than {self.settings.max_bytes} bytes (at {name!r})")
        if self.total > CHUNK and self.total / self.compressed > self.settings.max_ratio:
            raise ArchiveRejected(
                f"archive expands more than {self.settings.max_ratio:g}x its size "
                f"(at {name!r}): refused as a decompression bomb")


def _members(raw: IO[bytes], kind: str, budget: _Budget, root: str = ""
             ) -> Iterator[tuple[str, int, IO[bytes]]]:
    if kind == "zip":
        yield from _zip_members(raw, budget)
        return
    stream: IO[bytes]
    if kind == "tar.zst":
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK)
        mode = "r|"
    elif kind == "tar.gz":
        # gzip's own reader, not tarfile's "r|gz": tarfile's parses the gzip header itself
        # and fails with a TypeError on a header cut short
        stream, mode = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")), "r|"
    elif kind == "tar":
        stream, mode = raw, "r|"
    else:
        raise ArchiveRejected(f"unknown archive kind {kind!r}")
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:  # type: ignore[call-overload]
            for member in tar:
                budget.member(member.name)
                if member.isdir() and member.name.strip("/") in ("", "."):
                    continue
                name = _check_name(member.name)
                if member.isdir():
                    continue
                if root and not name.startswith(root + "/"):
                    if member.isreg():  # read through, so its bytes count for the budget
                        reader = tar.extractfile(member)
                        if reader is not None:
                            yield name, member.size, reader
                    continue
                if member.issym() or member.islnk():
                    raise ArchiveRejected(
                        f"archive member {member.name!r} is a link (to {member.linkname!r}); "
                        "links are refused")
                if member.ischr() or member.isblk() or member.isfifo():
                    raise ArchiveRejected(f"archive member {member.name!r} is a device or FIFO")
                if not member.isreg() or member.issparse():
                    raise ArchiveRejected(
                        f"archive member {member.name!r} has an unsupported type")
                reader = tar.extractfile(member)
                if reader is None:
                    raise ArchiveRejected(f"archive member {member.name!r} cannot be read")
                yield name, member.size, reader
    except (tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as e:
        raise ArchiveRejected(f"archive is corrupt or truncated: {e}") from e


def _zip_members(raw: IO[bytes], budget: _Budget) -> Iterator[tuple[str, int, IO[bytes]]]:
    try:
        with zipfile.ZipFile(raw) as zf:
            for info in zf.infolist():
                budget.member(info.filename)
                name = _check_name(info.filename)
                mode = info.external_attr >> 16
                if info.is_dir():
                    continue
                if stat.S_ISLNK(mode):
                    raise ArchiveRejected(f"archive member {info.filename!r} is a symlink")
                # Python's zipfile and many tools store permission bits without a file
                # type: only a stated type other than "regular" is refused.
                if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    raise ArchiveRejected(
                        f"archive member {info.filename!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise ArchiveRejected(f"archive member {info.filename!r} is encrypted")
                with zf.open(info) as reader:
                    yield name, info.file_size, reader
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError,
            NotImplementedError) as e:
        raise ArchiveRejected(f"zip archive is corrupt or unsupported: {e}") from e


def _check_name(name: str) -> str:
    try:
        return safe_relpath(name.rstrip("/") or name, what="archive member")
    except UnsafeName as e:
        raise ArchiveRejected(str(e)) from None


def _select(name: str, root: str) -> str | None:
    """The member's path in the model tree, or None if it is outside ``root``."""
    if not root:
        return name
    if name.startswith(root + "/"):
        return name[len(root) + 1:]
    return None


def _ingest(store: Ingester, rel: str, size: int, reader: IO[bytes],
            budget: _Budget) -> FileEntry:
    writer: BlobWriter = store.blob_writer()
    try:
        while chunk := reader.read(CHUNK):
            budget.grow(len(chunk), rel)
            writer.write(chunk)
        sealed = writer.commit(store.blobs, size)
    except BaseException:
        writer.abort()
        raise
    store.note_blob(sealed.blake3, sealed.size)
    return FileEntry(rel, sealed.size, sealed.blake3)


def _skip(reader: IO[bytes], size: int, budget: _Budget) -> None:
    with contextlib.suppress(OSError):
        while chunk := reader.read(CHUNK):
            budget.grow(len(chunk), "(skipped)")

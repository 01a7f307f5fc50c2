"""``file:///DIR``: a directory (or one file) on the node, for air-gap seeding and demos.

Only paths under the admin's ``--allow-path`` directories are read, after resolving
symlinks: a pod annotation can never turn a node file into a model. Symlinks are followed
only to regular files that are themselves under an allowed directory (a Hugging Face cache
snapshot is a tree of such links). Devices, FIFOs and sockets are refused.

The revision is a digest of the listing (paths, sizes, modification times).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import blake3

from agent.egress import Egress
from agent.sources.base import Credentials, Location, RemoteFile, Resolved
from agent.store.names import check_unique, safe_relpath
from common.errors import NotAllowed, SourceError, SourceNotFound, UnsafeName
from common.reference import Reference
from common.reference import archive_kind as kind_of

MAX_FILES = 100_000


class FileSource:
    schemes: tuple[str, ...] = ("file",)

    def __init__(self, egress: Egress) -> None:
        self.egress = egress

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        return await asyncio.to_thread(self._resolve, ref)

    def _resolve(self, ref: Reference) -> Resolved:
        root = self.egress.check_path(ref.path)
        try:
            st = root.stat()
        except FileNotFoundError:
            raise SourceNotFound(f"{ref.display} does not exist") from None
        if stat.S_ISREG(st.st_mode):
            kind = kind_of(root.name)
            files = [RemoteFile(root.name, root.as_uri(), st.st_size, unpack=kind)]  # type: ignore[arg-type]
            listing = [(root.name, st.st_size, st.st_mtime_ns)]
        elif stat.S_ISDIR(st.st_mode):
            files, listing = self._walk(root, ref)
        else:
            raise SourceError(f"{ref.display} is neither a file nor a directory")
        if not files:
            raise SourceError(f"{ref.display} holds no file selected by the include globs")
        h = blake3.blake3()
        for path, size, mtime in sorted(listing):
            h.update(f"{path}\0{size}\0{mtime}\n".encode())
        return Resolved(ref, "listing:" + h.hexdigest()[:32], tuple(files))

    def _walk(self, root: Path, ref: Reference
              ) -> tuple[list[RemoteFile], list[tuple[str, int, int]]]:
        files: list[RemoteFile] = []
        listing: list[tuple[str, int, int]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):
                    raise UnsafeName(f"{os.path.join(dirpath, d)} is a link to a directory")
            for name in sorted(filenames):
                full = Path(dirpath, name)
                rel = safe_relpath(full.relative_to(root).as_posix())
                if not ref.matches(rel):
                    continue
                real = full
                if full.is_symlink():
                    try:
                        real = self.egress.check_path(str(full))
                    except NotAllowed:
                        raise UnsafeName(
                            f"{full} is a link to a file outside the allowed directories"
                        ) from None
                st = real.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeName(f"{full} is not a regular file")
                files.append(RemoteFile(rel, real.as_uri(), st.st_size))
                listing.append((rel, st.st_size, st.st_mtime_ns))
                if len(files) > MAX_FILES:
                    raise SourceError(f"{root} holds more than {MAX_FILES} files")
        check_unique(f.path for f in files)
        return files, listing

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        return Location(file.url)

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        await asyncio.to_thread(self.egress.check_path, ref.path)

    async def close(self) -> None:
        return None

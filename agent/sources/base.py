"""What every source produces and how the fetch engine reaches its bytes.

A source turns a :class:`~common.reference.Reference` into a :class:`Resolved` plan: an
immutable revision and the files of the model, each with its size and the strong digest the
source states up front (if any). It makes control-plane calls only (listings, manifests,
tokens). The bytes are moved by the one fetch engine (``agent/fetch.py``), which asks the
source for a :class:`Location` (URL and headers) before each connection, so tokens and
presigned URLs that expire mid-pull are renewed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from common.reference import Reference

#: what an archive member list is unpacked from
ArchiveKind = Literal["tar", "tar.gz", "tar.zst", "zip"]

#: credentials as a flat mapping (a Secret's data, a file, the environment);
#: never logged, never in replies
Credentials = Mapping[str, str]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model at its source."""

    path: str
    """Where it goes in the model tree (checked by :func:`agent.store.names.safe_relpath`).
    For an archive: a name for progress and errors; its members become the files."""

    url: str
    """Where its bytes are: ``http(s)://...`` or ``file:///...``."""

    size: int | None = None
    """Size in bytes, when the source states it."""

    sha256: str | None = None
    """Lowercase hex sha256 the source states up front (OCI digest, HF LFS oid, S3 checksum).
    Verified in the same pass as blake3; content already stored under it is not fetched."""

    git_oid: str | None = None
    """The git blob id the source states for a file kept in git rather than LFS (Hugging
    Face's ``oid``): 40 hex of sha1 over ``blob <size>\\0`` and the bytes. Checked in the
    same pass as blake3 when there is no sha256; content already stored under it is not
    fetched again (a moved branch does not fetch its unchanged small files)."""

    etag: str | None = None
    """A change detector (ETag, Last-Modified): used to key partial downloads, never proof."""

    unpack: ArchiveKind | None = None
    """If set, the file is an archive whose regular members become the model's files."""

    unpack_root: str = ""
    """Only archive members under this directory are kept, with it stripped (modelcar
    images keep their model under ``models/``)."""

    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers for every request of this file (may hold secrets: never logged)."""


@dataclass(frozen=True)
class Location:
    """Where to send one request for a file's bytes."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to an immutable revision and its files."""

    ref: Reference
    revision: str
    """Immutable revision: commit sha, manifest digest, or a digest of the listing's
    ETags / Last-Modified values for sources without one."""

    files: tuple[RemoteFile, ...]

    source_uri: str | None = None
    """For references that point elsewhere (model-registry): the URI actually pulled."""

    credentials: Credentials | None = field(default=None, repr=False, compare=False)
    """With ``source_uri``: the credentials meant for that URI's source, when they are not
    the caller's (model-registry keeps its own token out of them). Never logged."""


class Source(Protocol):
    """The role every source plays: resolve a reference, locate a file's bytes."""

    #: the URI schemes this source handles
    schemes: tuple[str, ...]

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        """Resolve the reference; raise :class:`~common.errors.SourceError` subclasses."""
        ...

    async def locate(
        self, file: RemoteFile, credentials: Credentials | None, *, refresh: bool = False
    ) -> Location:
        """Where to GET the file now. ``refresh`` after a 401/403: renew tokens or URLs."""
        ...

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        """A cheap metadata request proving these credentials can read the reference
        (cross-namespace rule). Raise :class:`~common.errors.SourceAuthError` if not."""
        ...

    async def close(self) -> None:
        """Release sessions and connections."""
        ...

"""The store's roles: what a part of the agent needs from the store, and nothing more.

As containerd splits its content store (``Provider``, ``Ingester``, ``Manager`` in
``core/content/content.go``), the code that uses the store names the narrowest role it
needs:

- :class:`Provider` reads what is stored: committed blobs by digest, published models
  (manifest and tree).
- :class:`Ingester` writes blobs: resumable partial downloads (one writer per ref, under a
  lock) and sequential writers, both committed by size and digest; and it finds content
  already stored by the digest a source stated, so it is not fetched again.
- :class:`Publisher` makes a model visible (its tree and manifest, atomically), rewrites a
  manifest whose tree is unchanged, takes a model out of view, lets go of the blobs a pull
  held, and records the pulls in flight that a restart resumes.

Implementations: :class:`~agent.store.local.Store` plays all three;
:class:`~agent.store.modeldir.ModelDir` is the provider the init container reads (one
model's directory, as the pod's side mount shows it). ``tests/store`` runs one
conformance suite per role against every implementation.

Blocking: every method does file-system work; async callers run them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from agent.store.blobs import BlobStore
from agent.store.ingest import Ingest
from agent.store.trees import Manifest
from agent.store.writer import BlobWriter


class Provider(Protocol):
    """Reads committed blobs and published models."""

    def manifest(self, key: str) -> Manifest | None:
        """The model's current manifest, or None if no model of that key is published."""
        ...

    def manifests(self) -> list[Manifest]:
        """Every published model's current manifest."""
        ...

    def tree_path(self, manifest: Manifest) -> Path:
        """The directory of a published manifest's tree: its files, read-only, at their
        paths. Raises :class:`~common.errors.StoreError` for a model not provided here."""
        ...

    def blob_path(self, digest: str) -> Path | None:
        """A committed blob's file, to read (None if it is not stored here). Raises
        :class:`~common.errors.StoreError` if ``digest`` is not a blake3 digest."""
        ...

    def knows_stated(self, sha256: str | None, git_oid: str | None) -> bool:
        """Whether content with this sha256 or git blob id (as a source states them) is
        stored here."""
        ...


class Ingester(Protocol):
    """Writes and commits blobs, resumably."""

    @property
    def blobs(self) -> BlobStore:
        """Where commits land (:meth:`Ingest.commit`, :meth:`BlobWriter.commit`); a
        committed or found blob is held there until its pull lets go of it."""
        ...

    def open_ingest(self, ref: str, identity: dict[str, Any]) -> Ingest:
        """Take the lock of ``ref`` and open its partial download, resuming the bytes on
        disk if ``identity`` (size, digest, etag, url) is the same as when they were
        written. Raises :class:`~common.errors.Locked` ("locked since ...") if another
        writer holds it."""
        ...

    def blob_writer(self, expected_sha256: str | None = None) -> BlobWriter:
        """A writer for content that arrives in order (archive members, local copies)."""
        ...

    def note_blob(self, digest: str, size: int, sha256: str | None = None,
                  git_oid: str | None = None) -> None:
        """Record a committed blob and the digest its source stated for it."""
        ...

    def find_stated(self, sha256: str | None, git_oid: str | None) -> tuple[str, int] | None:
        """A committed blob with the strongest digest the source stated: (blake3, size),
        held for the caller; None if none is stored."""
        ...


class Publisher(Provider, Protocol):
    """Publishes model trees and their manifests; records pulls in flight."""

    @property
    def blobs(self) -> BlobStore:
        """The committed blobs a tree is published from (a signature is checked against
        them before the tree is published)."""
        ...

    @property
    def tmp(self) -> Path:
        """Scratch space on the store's own filesystem (the signature check's work)."""
        ...

    def publish(self, manifest: Manifest) -> Manifest:
        """Make the manifest's tree of committed blobs visible, then switch the model to it
        (older trees stay, listed in ``previous``); returns the manifest as published.
        Nothing is visible of a manifest that cannot be published."""
        ...

    def update_manifest(self, manifest: Manifest) -> None:
        """Rewrite the manifest of a model whose tree is unchanged (last use, pin); a model
        removed meanwhile stays removed."""
        ...

    def remove_model(self, key: str) -> None:
        """Take a model out of view (its manifest first, then its trees); its blobs stay
        until they are collected."""
        ...

    def release(self, digests: Iterable[str]) -> None:
        """Let go of the blobs a pull held (found or committed) once it is published or
        has failed."""
        ...

    def write_intent(self, key: str, intent: dict[str, Any]) -> None:
        """Record a pull in flight, so that a restart resumes it."""
        ...

    def remove_intent(self, key: str) -> None:
        ...

    def intents(self) -> dict[str, dict[str, Any]]:
        """The pulls in flight, by model key."""
        ...

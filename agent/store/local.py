"""The store on the node's disk: blobs, published trees, partial downloads, pull intents.

This is the one object the rest of the agent holds; it plays every role of
:mod:`agent.store.roles` (provider, ingester, publisher). It keeps in memory only what it can
rebuild from disk at start-up (:mod:`agent.store.recovery`): blob sizes, the sha256 (and git
blob id) -> blake3 aliases that let a source's stated digest find content already stored, and
the manifests.

Blocking: methods touch the disk; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.store.blobs import BlobStore, write_atomic
from agent.store.ingest import Ingest, check_ref
from agent.store.trees import FileEntry, Manifest, Trees, check_tree, clean_paths, tree_id
from agent.store.writer import BlobWriter
from common.errors import StoreError


@dataclass(frozen=True)
class Usage:
    """What the store holds, and what its filesystem has left."""

    capacity_bytes: int
    used_bytes: int
    """Filesystem bytes in use (by everything on it, not just the cache)."""
    free_bytes: int
    """Bytes available to the agent (statvfs ``f_bavail``)."""
    cache_bytes: int
    """Bytes of distinct blobs."""
    blobs: int
    dedup_saved_bytes: int
    """Bytes the published trees would take without dedup, minus what they take."""
    inodes_free_ratio: float


class Store:
    """A modelcache store rooted at one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root / "blobs")
        self.models = root / "models"
        self.partial = root / "partial"
        self.tmp = root / "tmp"
        self.pulls = root / "pulls"
        self.leases_file = root / "leases.json"
        """Standalone leases: which models are in use (:mod:`agent.eviction.leases`)."""
        self.trees = Trees(self.models, self.tmp, self.blobs)
        self._lock = threading.Lock()
        self._removing = threading.Lock()
        """Held while a model is removed, so a concurrent manifest update cannot bring
        back the manifest of a model being evicted."""
        self._sizes: dict[str, int] = {}
        self._stated: dict[str, str] = {}
        """``sha256:HEX`` / ``git:HEX`` (digests sources stated) -> blake3 of the blob."""
        self._manifests: dict[str, Manifest] = {}

    def ensure_layout(self) -> None:
        for d in (self.root, self.blobs.root, self.models, self.partial, self.tmp, self.pulls):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.partial, 0o700)
        os.chmod(self.tmp, 0o700)

    # --- blobs ---------------------------------------------------------------------------

    def open_ingest(self, ref: str, identity: dict[str, Any]) -> Ingest:
        return Ingest.open(self.partial, ref, identity)

    def blob_writer(self, expected_sha256: str | None = None) -> BlobWriter:
        return BlobWriter(self.tmp, expected_sha256)

    def note_blob(self, digest: str, size: int, sha256: str | None = None,
                  git_oid: str | None = None) -> None:
        """Record a committed blob (and the sha256 or git blob id a source stated for it)."""
        with self._lock:
            self._note_locked(digest, size, sha256, git_oid)

    def _note_locked(self, digest: str, size: int, sha256: str | None,
                     git_oid: str | None) -> None:
        self._sizes[digest] = size
        for key in _stated_keys(sha256, git_oid):
            self._stated[key] = digest

    def find_sha256(self, sha256: str) -> tuple[str, int] | None:
        """A committed blob whose content has this sha256: (blake3, size), or None.
        A blob found is held for the caller (release it with ``blobs.release``)."""
        return self._find(f"sha256:{sha256}")

    def find_stated(self, sha256: str | None, git_oid: str | None) -> tuple[str, int] | None:
        """Like :meth:`find_sha256`, by the strongest digest a source stated: its sha256,
        else its git blob id."""
        keys = _stated_keys(sha256, git_oid)
        return self._find(keys[0]) if keys else None

    def _find(self, key: str) -> tuple[str, int] | None:
        with self._lock:
            digest = self._stated.get(key)
        if digest is None:
            return None
        self.blobs.hold(digest)
        info = self.blobs.info(digest)
        if info is None:
            self.blobs.release([digest])
            with self._lock:
                self._stated.pop(key, None)
                self._sizes.pop(digest, None)
            return None
        return digest, info.size

    def knows_stated(self, sha256: str | None, git_oid: str | None) -> bool:
        """Whether content with this sha256 or git blob id is (probably) stored; no hold
        taken."""
        with self._lock:
            return any(k in self._stated for k in _stated_keys(sha256, git_oid))

    def blob_path(self, digest: str) -> Path | None:
        path = self.blobs.path(digest)
        return path if path.is_file() else None

    def release(self, digests: Iterable[str]) -> None:
        self.blobs.release(digests)

    def has_blob(self, digest: str, size: int) -> bool:
        info = self.blobs.info(digest)
        return info is not None and info.size == size

    def remove_blob(self, digest: str) -> int:
        """Collect a blob no tree links and no pull holds; returns the bytes freed."""
        return self.remove_unreferenced([digest])

    def remove_unreferenced(self, digests: Iterable[str]) -> int:
        """Collect those of ``digests`` that no tree links and no running pull holds (both
        checked on disk and under the blob store's lock, blob by blob); return the bytes
        freed. A blob still linked or held is kept."""
        freed = 0
        gone: set[str] = set()
        for digest in digests:
            n = self.blobs.collect(digest)
            if n or not self.blobs.exists(digest):
                freed += n
                gone.add(digest)
        if gone:
            with self._lock:
                for digest in gone:
                    self._sizes.pop(digest, None)
                self._stated = {s: d for s, d in self._stated.items() if d not in gone}
        return freed

    def unreferenced_blobs(self, keep: Iterable[str] = ()) -> list[str]:
        """Blobs no published tree links, no pull holds (and not in ``keep``)."""
        keep = set(keep) | self.blobs.held()
        return [b.digest for b in self.blobs if b.refs == 0 and b.digest not in keep]

    # --- models --------------------------------------------------------------------------

    def manifest(self, key: str) -> Manifest | None:
        with self._lock:
            return self._manifests.get(key)

    def manifests(self) -> list[Manifest]:
        with self._lock:
            return list(self._manifests.values())

    def tree_path(self, manifest: Manifest) -> Path:
        path = self.trees.model_dir(manifest.key) / check_tree(manifest.tree)
        if not path.is_dir():
            raise StoreError(f"tree {manifest.tree} of model {manifest.key} is not in the store")
        return path

    def publish(self, manifest: Manifest) -> Manifest:
        """Publish a tree and switch the model's manifest to it; older trees are kept
        (listed in ``previous``) until :meth:`drop_tree` removes them."""
        old = self.trees.read_manifest(manifest.key)
        manifest = replace(manifest, files=clean_paths(manifest.files))
        tree = tree_id(manifest.files)
        previous: list[str] = []
        for t in (*old.previous, old.tree) if old is not None else ():
            if t != tree and t not in previous:
                previous.append(t)
        # One manifest write that already lists the older trees: a crash can never leave a
        # manifest on disk that forgets a tree a running pod still uses.
        published = self.trees.publish(replace(manifest, previous=tuple(previous)))
        with self._lock:
            self._manifests[published.key] = published
            for f in published.files:
                self._note_locked(f.blake3, f.size, f.sha256, f.git_oid)
        return published

    def claim_model_dir(self, key: str) -> None:
        """Make ``models/<key>`` the agent's own now, before a pod's hostPath is set up
        (:meth:`Trees.claim`)."""
        self.trees.claim(key)

    def update_manifest(self, manifest: Manifest) -> None:
        """Rewrite a manifest whose tree is unchanged (last use, pin); a model removed
        meanwhile stays removed."""
        with self._removing:
            if self.manifest(manifest.key) is None:
                return
            self.trees.write_manifest(manifest)
            with self._lock:
                self._manifests[manifest.key] = manifest

    def drop_tree(self, key: str, tree: str) -> None:
        """Remove an older tree of a model (never its current one)."""
        manifest = self.manifest(key)
        if manifest is not None and manifest.tree == tree:
            raise StoreError(f"tree {tree} is the current tree of model {key}")
        # Forget the tree first, then delete it: a crash in between leaves an unnamed tree,
        # which recovery removes, never a manifest that names a tree that is gone.
        if manifest is not None and tree in manifest.previous:
            kept = tuple(t for t in manifest.previous if t != tree)
            self.update_manifest(replace(manifest, previous=kept))
        self.trees.remove_tree(key, tree)

    def remove_model(self, key: str) -> None:
        """Remove a model: its manifest first (durably: it is no longer visible), then its
        trees. Its blobs stay until :meth:`remove_unreferenced`; a crash at any point
        leaves the model complete or invisible (recovery removes unnamed trees)."""
        with self._removing:
            with self._lock:
                self._manifests.pop(key, None)
            self.trees.remove_model(key)

    def load_manifest(self, manifest: Manifest) -> None:
        """Register a manifest found on disk (recovery)."""
        with self._lock:
            self._manifests[manifest.key] = manifest
            for f in manifest.files:
                self._note_locked(f.blake3, f.size, f.sha256, f.git_oid)

    # --- pull intents --------------------------------------------------------------------

    def write_intent(self, key: str, intent: dict[str, Any]) -> None:
        """Record a pull in flight, so that a restart resumes it. Not fsynced: an intent lost
        with the page cache (a power cut) costs a download, never a wrong byte."""
        write_atomic(self.pulls / f"{key}.json", json.dumps(intent).encode(), self.pulls,
                     durable=False)

    def remove_intent(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.pulls / f"{key}.json").unlink()

    def intents(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.pulls):
                if entry.name.startswith(".") or not entry.name.endswith(".json"):
                    continue
                try:
                    found[entry.name[:-5]] = json.loads(Path(entry.path).read_text())
                except (OSError, ValueError):
                    Path(entry.path).unlink(missing_ok=True)
        return found

    def partial_refs(self) -> list[str]:
        """The refs of the partial downloads on disk (whoever holds them)."""
        return [e.name for e in os.scandir(self.partial)]

    def partial_allocated(self, ref: str) -> int:
        """Bytes the data of a partial download takes on disk (its allocated blocks, which
        preallocation makes its whole size); 0 if there is none."""
        try:
            return (self.partial / check_ref(ref) / "data").stat().st_blocks * 512
        except (OSError, StoreError):
            return 0

    def remove_partial(self, ref: str) -> None:
        shutil.rmtree(self.partial / check_ref(ref), ignore_errors=True)

    def discard_partials(self, refs: Iterable[str]) -> int:
        """Remove the named partial downloads that no writer holds (their lock is free);
        return the bytes they took on disk."""
        freed = 0
        for ref in refs:
            directory = self.partial / ref
            try:
                fd = os.open(directory / "lock", os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                freed += sum(e.stat().st_blocks * 512 for e in os.scandir(directory)
                             if e.is_file(follow_symlinks=False))
                shutil.rmtree(directory, ignore_errors=True)
            except BlockingIOError:
                continue  # a writer holds it
            finally:
                os.close(fd)
        return freed

    # --- accounting ----------------------------------------------------------------------

    def usage(self) -> Usage:
        st = os.statvfs(self.root)
        capacity = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        inodes = st.f_files or 1
        with self._lock:
            cache = sum(self._sizes.values())
            blobs = len(self._sizes)
            refs: Counter[str] = Counter()
            logical = 0
            for m in self._manifests.values():
                for f in m.files:
                    refs[f.blake3] += 1
                    logical += f.size
            distinct = sum(self._sizes.get(d, 0) for d in refs)
        return Usage(capacity, used, st.f_bavail * st.f_frsize, cache, blobs,
                     max(0, logical - distinct), st.f_favail / inodes)

    def cache_bytes(self) -> int:
        """Bytes of distinct committed blobs (cheaper than :meth:`usage`)."""
        with self._lock:
            return sum(self._sizes.values())

    def blob_sizes(self) -> dict[str, int]:
        """A copy of the committed blobs' sizes by digest."""
        with self._lock:
            return dict(self._sizes)

    def set_blob_sizes(self, sizes: dict[str, int]) -> None:
        with self._lock:
            self._sizes = dict(sizes)


def _stated_keys(sha256: str | None, git_oid: str | None) -> list[str]:
    return [*([f"sha256:{sha256}"] if sha256 else []), *([f"git:{git_oid}"] if git_oid else [])]


__all__ = ["FileEntry", "Manifest", "Store", "Usage"]

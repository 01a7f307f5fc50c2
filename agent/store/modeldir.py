"""One model's directory (``models/<key>``) read on its own: the store as a pod sees it.

The init container gets the model's store directory as a read-only side mount (cache mode,
docs/webhook.md) and nothing else of the store: no ``blobs/``, no other model. This is the
:class:`~agent.store.roles.Provider` over that view. It reads the manifest from disk at every
call (the agent may publish a new revision under a running pod), serves only the tree that
manifest names, and a blob only as a file of that tree (every file is a hard link to its
blob). A manifest that is missing, unreadable, of another model, or whose tree is not there
is no model: the init container then falls back to the source.

Blocking: file-system work; async callers run these in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.store.blobs import valid_digest
from agent.store.names import join_inside
from agent.store.trees import MANIFEST, Manifest, check_tree
from common.errors import ModelcacheError, StoreError


class ModelDir:
    """The provider of the one model ``key`` published under ``root`` (``models/<key>``)."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.key = key

    def manifest(self, key: str) -> Manifest | None:
        if key != self.key:
            return None
        try:
            manifest = Manifest.from_json(json.loads((self.root / MANIFEST).read_text()))
        except (OSError, ValueError, KeyError, TypeError, ModelcacheError):
            return None
        if manifest.key != key or not (self.root / manifest.tree).is_dir():
            return None
        return manifest

    def manifests(self) -> list[Manifest]:
        manifest = self.manifest(self.key)
        return [manifest] if manifest is not None else []

    def tree_path(self, manifest: Manifest) -> Path:
        if manifest.key != self.key:
            raise StoreError(f"{self.root} holds model {self.key}, not {manifest.key}")
        path = self.root / check_tree(manifest.tree)
        if not path.is_dir():
            raise StoreError(f"tree {manifest.tree} of model {manifest.key} is not in {self.root}")
        return path

    def blob_path(self, digest: str) -> Path | None:
        if not valid_digest(digest):
            raise StoreError(f"not a blake3 digest: {digest[:80]!r}")
        manifest = self.manifest(self.key)
        if manifest is None:
            return None
        tree = self.root / manifest.tree
        for f in manifest.files:
            if f.blake3 == digest:
                path = join_inside(tree, f.path)
                if path.is_file():
                    return path
        return None

    def knows_stated(self, sha256: str | None, git_oid: str | None) -> bool:
        manifest = self.manifest(self.key)
        if manifest is None:
            return False
        return any((sha256 and f.sha256 == sha256) or (git_oid and f.git_oid == git_oid)
                   for f in manifest.files)

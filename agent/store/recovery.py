"""Start-up recovery: the filesystem is the truth, the index is rebuilt from it.

- ``tmp/`` is emptied: staged trees, manifests and blobs there never became visible; so
  are half-written pull intents (``pulls/.*``);
- partial downloads that no pull intent names are removed; the others are resumed;
- each manifest is checked against its tree (every file a link of its blob; a blob name lost
  while a tree still holds the content is restored from the tree); a manifest whose tree is
  broken is removed, so the model is not visible; trees no manifest names are removed;
- blobs that no tree links and no pull intent needs are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field

from agent.store.local import Store
from agent.store.trees import MANIFEST, Manifest
from common.errors import StoreError

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    models: int = 0
    blobs: int = 0
    intents: list[str] = field(default_factory=list)
    removed_partials: int = 0
    removed_blobs: int = 0
    removed_trees: int = 0
    broken_models: list[str] = field(default_factory=list)
    restored_blob_names: int = 0


def recover(store: Store) -> Recovery:
    store.ensure_layout()
    report = Recovery()
    for entry in os.scandir(store.tmp):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    for entry in os.scandir(store.pulls):
        if entry.name.startswith("."):  # an intent being written when the agent died
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    intents = store.intents()
    report.intents = sorted(intents)
    keep_refs: set[str] = set()
    keep_blobs: set[str] = set()
    for intent in intents.values():
        keep_refs.update(intent.get("refs", ()))
        keep_blobs.update(intent.get("blobs", ()))
    for entry in os.scandir(store.partial):
        if entry.name not in keep_refs:
            shutil.rmtree(entry.path, ignore_errors=True)
            report.removed_partials += 1

    sizes = {b.digest: b.size for b in store.blobs}
    for key in list(store.trees.keys()):
        manifest = _check_model(store, key, report)
        wanted = {manifest.tree, *manifest.previous} if manifest else set()
        for tree in store.trees.trees(key):
            if tree not in wanted:
                store.trees.remove_tree(key, tree)
                report.removed_trees += 1
        if manifest is not None:
            store.load_manifest(manifest)
            report.models += 1
            for f in manifest.files:
                sizes.setdefault(f.blake3, f.size)

    for info in list(store.blobs):
        if info.refs == 0 and info.digest not in keep_blobs:
            store.blobs.remove(info.digest)
            sizes.pop(info.digest, None)
            report.removed_blobs += 1
    store.set_blob_sizes(sizes)
    report.blobs = len(sizes)
    return report


def _check_model(store: Store, key: str, report: Recovery) -> Manifest | None:
    model_dir = store.trees.model_dir(key)
    try:
        manifest = store.trees.read_manifest(key)
    except StoreError as e:
        log.warning("removing unreadable manifest", extra={"key": key, "error": str(e)})
        (model_dir / MANIFEST).unlink(missing_ok=True)
        report.broken_models.append(key)
        return None
    if manifest is None:
        return None
    if manifest.key != key:
        log.warning("manifest names another key", extra={"key": key})
        (model_dir / MANIFEST).unlink(missing_ok=True)
        report.broken_models.append(key)
        return None
    tree_dir = model_dir / manifest.tree
    for f in manifest.files:
        try:
            st = os.stat(tree_dir.joinpath(*f.path.split("/")), follow_symlinks=False)
        except FileNotFoundError:
            log.warning("model tree is missing a file; hiding the model",
                        extra={"key": key, "path": f.path})
            (model_dir / MANIFEST).unlink(missing_ok=True)
            report.broken_models.append(key)
            return None
        blob = store.blobs.path(f.blake3)
        try:
            bst = os.stat(blob)
        except FileNotFoundError:
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.link(tree_dir.joinpath(*f.path.split("/")), blob)
            report.restored_blob_names += 1
            continue
        if (bst.st_ino, bst.st_dev) != (st.st_ino, st.st_dev) or st.st_size != f.size:
            log.warning("model tree file is not its blob; hiding the model",
                        extra={"key": key, "path": f.path})
            (model_dir / MANIFEST).unlink(missing_ok=True)
            report.broken_models.append(key)
            return None
    return manifest

"""Published model trees and their manifests under ``models/<key>/``.

A tree is built in ``tmp/`` as hard links to committed blobs, fsynced, then renamed into
``models/<key>/<tree>`` in one step: a reader of ``models/`` sees no tree or a complete one.
The manifest (``models/<key>/manifest.json``) is written to ``tmp/`` and renamed over the old
one, so it always names a complete tree. A tree's name is derived from its content.

Blocking: file-system work; async callers run these in a thread.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from agent.store.blobs import BlobStore, fsync_dir, valid_digest, write_atomic
from agent.store.names import check_unique, join_inside, safe_relpath
from common.errors import StoreError, UnsafeName

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TREE = re.compile(r"^t-[0-9a-f]{16}$")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    blake3: str
    """The blob's name; :data:`WHITEOUT` for an image layer's whiteout (no blob)."""
    sha256: str | None = None
    git_oid: str | None = None
    """The git blob id the source stated (a Hugging Face file kept in git), if any."""

    @property
    def whiteout(self) -> bool:
        return self.blake3 == WHITEOUT


WHITEOUT = ""
"""``FileEntry.blake3`` of an OCI whiteout from an image layer: ``path`` is the member as
the layer names it (``dir/.wh.NAME`` deletes ``dir/NAME`` from the layers below it,
``dir/.wh..wh..opq`` everything below ``dir``). It never reaches a tree."""
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"


def apply_whiteout(tree: dict[str, FileEntry], whiteout: str) -> None:
    """Delete from ``tree`` (the layers below) what the whiteout member ``whiteout``
    deletes."""
    parent, _, base = whiteout.rpartition("/")
    prefix = parent + "/" if parent else ""
    if base == OPAQUE:
        doomed = [p for p in tree if p.startswith(prefix)]
    else:
        target = prefix + base[len(WHITEOUT_PREFIX):]
        doomed = [p for p in tree if p == target or p.startswith(target + "/")]
    for p in doomed:
        del tree[p]


@dataclass(frozen=True)
class Verification:
    """A passing signature check of a model's files (``agent.verify``), as its manifest
    records it: only a model that passed is ever published under a policy."""

    policy: str
    """The policy's scope (``NAME``, or ``NAMESPACE/NAME`` in a cluster): the key's."""
    signer: str
    """Who signed: the key's id, the certificate's subject, or the Sigstore identity."""
    time: float
    """When the check passed."""
    method: str
    """``publicKey``, ``certificateChain`` or ``sigstore``."""
    policy_digest: str
    """sha256 over the policy's trust material when it passed: a policy changed since
    (a rotated key) is checked again."""
    tree: str
    """The tree whose files passed (a manifest's check holds for its current tree only)."""

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "signer": self.signer, "time": iso(self.time),
                "method": self.method, "policy_digest": self.policy_digest,
                "tree": self.tree}

    @classmethod
    def from_json(cls, data: Any) -> Verification | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise StoreError("manifest has an invalid 'verified' record")
        try:
            return cls(str(data["policy"]), str(data["signer"]), parse_iso(data.get("time")),
                       str(data["method"]), str(data["policy_digest"]), str(data["tree"]))
        except KeyError as e:
            raise StoreError(f"manifest's 'verified' record has no {e}") from None


@dataclass(frozen=True)
class Manifest:
    key: str
    uri: str
    revision: str
    tree: str
    files: tuple[FileEntry, ...]
    include: tuple[str, ...] = ()
    source_uri: str | None = None
    created: float = 0.0
    last_used: float = 0.0
    resolved_at: float = 0.0
    pinned: bool = False
    previous: tuple[str, ...] = field(default=())
    """Older trees still on disk (kept while a pod may use them)."""
    verify: str = ""
    """The signature policy the model's reference names (part of its key); empty: none."""
    verified: Verification | None = None
    """The passing signature check of the current tree, if a policy asked for one."""
    credentials: str | None = ""
    """The credentials scope of the model's reference (part of its key): ``""`` for a pull
    without credentials, ``NAMESPACE/SECRET`` for one with a namespace's Secret; None in a
    manifest written before the scope was recorded (who may see it is then unknown)."""

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = MANIFEST_VERSION
        data["size_bytes"] = self.size_bytes
        data["created"] = iso(self.created)
        data["last_used"] = iso(self.last_used)
        data["resolved_at"] = iso(self.resolved_at)
        data["verified"] = self.verified.to_json() if self.verified else None
        data["credentials"] = self.credentials or ""
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("version") != MANIFEST_VERSION:
            raise StoreError(f"manifest version {data.get('version')!r} is not supported")
        files = tuple(FileEntry(f["path"], int(f["size"]), f["blake3"], f.get("sha256"),
                                f.get("git_oid")) for f in data["files"])
        _check_names(data["tree"], data.get("previous", ()), files)
        return cls(
            key=data["key"], uri=data["uri"], revision=data["revision"], tree=data["tree"],
            files=files, include=tuple(data.get("include", ())),
            source_uri=data.get("source_uri"), created=parse_iso(data.get("created")),
            last_used=parse_iso(data.get("last_used")),
            resolved_at=parse_iso(data.get("resolved_at")),
            pinned=bool(data.get("pinned", False)), previous=tuple(data.get("previous", ())),
            verify=str(data.get("verify") or ""),
            verified=Verification.from_json(data.get("verified")),
            credentials=str(data["credentials"]) if data.get("credentials") is not None
            else None,
        )


def check_tree(name: Any) -> str:
    """A tree's name (``t-`` and 16 hex) builds a path only once checked."""
    if not isinstance(name, str) or not _TREE.match(name):
        raise StoreError(f"manifest names an invalid tree {str(name)[:80]!r}")
    return name


def _check_names(tree: Any, previous: Any, files: tuple[FileEntry, ...]) -> None:
    """A manifest on disk is input like any other: its names build paths only once checked."""
    for name in (tree, *previous):
        check_tree(name)
    for f in files:
        try:
            safe_relpath(f.path, what="manifest file")
        except UnsafeName as e:
            raise StoreError(str(e)) from None
        if not valid_digest(f.blake3):
            raise StoreError(f"manifest file {f.path!r} has an invalid blake3 digest")


def clean_paths(files: Iterable[FileEntry]) -> tuple[FileEntry, ...]:
    """The entries with their paths checked and in one spelling (``./a`` is ``a``), each
    path once: two spellings of one path must not both reach the file system."""
    cleaned = tuple(replace(f, path=safe_relpath(f.path)) for f in files)
    check_unique(f.path for f in cleaned)
    return cleaned


def tree_id(files: Iterable[FileEntry]) -> str:
    """``t-`` and 16 hex of blake3 over the sorted (path, size, blake3) list."""
    h = blake3.blake3()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.blake3}\n".encode())
    return "t-" + h.hexdigest()[:16]


class Trees:
    """The ``models/`` directory of a store."""

    def __init__(self, models: Path, tmp: Path, blobs: BlobStore) -> None:
        self.root = models
        self.tmp = tmp
        self.blobs = blobs

    def model_dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise StoreError(f"invalid model key {key!r}")
        return self.root / key

    def claim(self, key: str) -> Path:
        """``models/<key>``, made now by the agent (0755) if it is missing: a pod's hostPath
        is bound to this very directory, and only one the agent made can it publish into
        (docs/store.md, "Who makes models/<key>"). One that someone else made and left empty
        (kubelet's ``DirectoryOrCreate`` of an older webhook, as root) is replaced by the
        agent's own; a foreign one with content is an error naming its owner."""
        model_dir = self.model_dir(key)
        try:
            st = os.lstat(model_dir)
        except FileNotFoundError:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(model_dir)
                    os.chmod(model_dir, 0o755)  # noqa: S103 - pods of any uid read models
            except OSError as e:
                raise StoreError(f"cannot make {model_dir}: {e.strerror}") from e
            st = os.lstat(model_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{model_dir} is not a directory")
        if st.st_uid == os.geteuid():
            return model_dir
        try:
            os.rmdir(model_dir)
        except OSError as e:
            raise StoreError(
                f"{model_dir} belongs to uid {st.st_uid}, not to the agent (uid "
                f"{os.geteuid()}), and cannot be replaced ({e.strerror}); the agent's "
                "store-owner step hands such directories over at its next start") from e
        os.mkdir(model_dir)
        os.chmod(model_dir, 0o755)  # noqa: S103 - pods of any uid read models
        fsync_dir(self.root)
        log.warning("replaced a model directory the agent did not make", extra={
            "key": key, "owner": st.st_uid})
        return model_dir

    def keys(self) -> Iterator[str]:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    yield entry.name

    def trees(self, key: str) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(e.name for e in os.scandir(self.model_dir(key))
                          if e.is_dir(follow_symlinks=False) and e.name.startswith("t-"))
        return []

    def read_manifest(self, key: str) -> Manifest | None:
        path = self.model_dir(key) / MANIFEST
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"manifest of model {key} is unreadable: {e}") from e

    def publish(self, manifest: Manifest) -> Manifest:
        """Make the manifest's tree visible (if it is not already), then switch the
        manifest to it. The tree's files must all be committed blobs."""
        files = clean_paths(manifest.files)
        tree = tree_id(files)
        manifest = replace(manifest, tree=tree, files=files)
        model_dir = self.claim(manifest.key)
        target = model_dir / tree
        if not target.is_dir():
            self._build(tree, files, model_dir, target)
        self.write_manifest(manifest)
        return manifest

    def _build(self, tree: str, files: tuple[FileEntry, ...], model_dir: Path,
               target: Path) -> None:
        stage = self.tmp / f"tree-{tree}-{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            made = {stage}
            for f in files:
                dst = join_inside(stage, f.path)
                parent = dst.parent
                if parent not in made:
                    parent.mkdir(parents=True, exist_ok=True)
                    while parent not in made:
                        made.add(parent)
                        parent = parent.parent
                try:
                    os.link(self.blobs.path(f.blake3), dst)
                except FileNotFoundError as e:
                    raise StoreError(f"blob {f.blake3} of {f.path} is not in the store") from e
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
            try:
                os.rename(stage, target)
            except OSError as e:
                if not target.is_dir():
                    raise StoreError(f"cannot publish tree {tree}: {e.strerror}") from e
                shutil.rmtree(stage, ignore_errors=True)  # another publisher won: same content
            fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def write_manifest(self, manifest: Manifest) -> None:
        data = json.dumps(manifest.to_json(), indent=1).encode()
        write_atomic(self.model_dir(manifest.key) / MANIFEST, data, self.tmp)

    def remove_tree(self, key: str, tree: str) -> None:
        """Take a tree out of ``models/`` in one rename, then delete it."""
        src = self.model_dir(key) / tree
        if not src.is_dir():
            return
        trash = self.tmp / f"trash-{key}-{tree}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        os.rename(src, trash)
        fsync_dir(src.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_model(self, key: str) -> None:
        """Remove a model: its manifest first (it stops being visible), then its trees.

        ``models/<key>`` itself stays (empty): a pod's hostPath may be bound to it.
        """
        model_dir = self.model_dir(key)
        with contextlib.suppress(FileNotFoundError):
            (model_dir / MANIFEST).unlink()
            fsync_dir(model_dir)
        for tree in self.trees(key):
            self.remove_tree(key, tree)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def parse_iso(value: Any) -> float:
    if not value:
        return 0.0
    try:
        return float(calendar.timegm(time.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return 0.0

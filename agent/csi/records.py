"""Publish records: which CSI volume shows which model's tree at which target path.

One JSON file per volume under ``<store>/csi/`` (directory 0700, files 0600), written with a
temporary file, fsync and rename *before* the mount is made and removed only after the
unmount, so that after a crash every mount of ours has a record. At start-up the records are
compared with the kernel's mount table: a record whose target is still mounted holds its model
in use; one whose target is not mounted is dropped (the crash came before the mount, or after
the unmount).

Blocking: file-system work; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.store.blobs import fsync_dir, write_atomic
from common.errors import StoreError

log = logging.getLogger(__name__)
DIRECTORY = "csi"
VERSION = 1


@dataclass(frozen=True)
class Record:
    volume_id: str
    target: str
    key: str
    """The model's key, as the puller gave it."""
    tree: str
    """The tree mounted (the model's current tree when it was published)."""
    uri: str
    include: tuple[str, ...] = ()
    credentials: str | None = None
    namespace: str | None = None
    pod: str | None = None
    """``namespace/name`` of the pod, as kubelet named it."""
    pod_uid: str | None = None
    published: float = 0.0
    verify: str | None = None
    """The signature policy asked for (``volumeAttributes.verify``)."""

    @property
    def holder(self) -> str:
        """The ``Model.holders`` key of this volume."""
        return f"csi:{self.volume_id}"

    def same_request(self, other: Record) -> bool:
        """Whether ``other`` asks for what this record published, at the same place."""
        return (self.target, self.uri, self.include, self.credentials, self.verify) == \
            (other.target, other.uri, other.include, other.credentials, other.verify)


class Records:
    """The records of one store."""

    def __init__(self, store_root: Path) -> None:
        self.root = store_root / DIRECTORY
        self._records: dict[str, Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def get(self, volume_id: str) -> Record | None:
        return self._records.get(volume_id)

    def load(self) -> list[Record]:
        """Read every record on disk (unreadable ones are logged and left alone)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        found: dict[str, Record] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.suffix != ".json":
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.startswith("."):
                        entry.unlink()  # a record being written when the agent died
                continue
            try:
                record = _from_json(json.loads(entry.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("unreadable CSI publish record left alone",
                            extra={"path": str(entry), "error": str(e)})
                continue
            if entry.name != _file_name(record.volume_id):
                log.warning("CSI publish record under a wrong name left alone",
                            extra={"path": str(entry)})
                continue
            found[record.volume_id] = record
        self._records = found
        return list(found.values())

    def put(self, record: Record) -> None:
        """Record a publish durably (before its mount is made)."""
        data = json.dumps({"version": VERSION, **asdict(record)}, sort_keys=True).encode()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            write_atomic(self.root / _file_name(record.volume_id), data, self.root, mode=0o600)
        except OSError as e:
            raise StoreError(f"cannot record the publish of volume {record.volume_id}: "
                             f"{e.strerror}") from e
        self._records[record.volume_id] = record

    def remove(self, volume_id: str) -> Record | None:
        """Forget a publish durably (after its unmount)."""
        record = self._records.pop(volume_id, None)
        path = self.root / _file_name(volume_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return record
        except OSError as e:
            if record is not None:
                self._records[volume_id] = record
            raise StoreError(f"cannot remove the publish record of volume {volume_id}: "
                             f"{e.strerror}") from e
        fsync_dir(self.root)
        return record


def _file_name(volume_id: str) -> str:
    """Volume ids are any string kubelet or a CO chose: the file is named by their hash."""
    return hashlib.sha256(volume_id.encode()).hexdigest()[:32] + ".json"


def _from_json(data: Any) -> Record:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError("not a CSI publish record of this version")

    def text(name: str, required: bool = True) -> str | None:
        value = data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value):
            raise ValueError(f"{name} is missing or not a string")
        return value

    include = data.get("include") or []
    published = data.get("published", 0.0)
    if not isinstance(include, list) or not all(isinstance(g, str) for g in include):
        raise ValueError("include is not a list of globs")
    if isinstance(published, bool) or not isinstance(published, int | float):
        raise ValueError("published is not a number")
    return Record(
        volume_id=str(text("volume_id")), target=str(text("target")), key=str(text("key")),
        tree=str(text("tree")), uri=str(text("uri")), include=tuple(include),
        credentials=text("credentials", False), verify=text("verify", False),
        namespace=text("namespace", False),
        pod=text("pod", False), pod_uid=text("pod_uid", False), published=float(published))

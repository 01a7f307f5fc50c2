"""The store's hand-over to the agent's user: the DaemonSet's one-shot ``store-owner`` step.

kubelet makes the store's hostPath as root:root 0755 (``DirectoryOrCreate``), and an older
webhook's ``DirectoryOrCreate`` hostPath made ``models/`` and ``models/<key>`` the same way,
possibly before the agent ever ran on the node. The long-running agent has no capability at
all, so it could never write into them. This step runs before it as root with ``CAP_CHOWN``
alone (no ``CAP_DAC_OVERRIDE``: it reads only what "others" may read) and gives the agent's
uid the store's root, ``models/`` and every directory directly in ``models/`` that is not
the agent's yet: a chown keeps the directory's inode, so a pod already bound to one sees the
model once the agent publishes it. Nothing is followed through a symbolic link and nothing
deeper is touched (trees and blobs are the agent's own).

    modelcache prepare-store --store /var/lib/modelcache --owner 65532:65532

Blocking: file-system work, run once at start-up.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from common.errors import InvalidInput, StoreError

MODELS = "models"


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` (numbers); :class:`InvalidInput` naming it otherwise."""
    uid, sep, gid = text.partition(":")
    if not (uid.isdigit() and sep and gid.isdigit()):
        raise InvalidInput(f"owner {text!r} is not UID:GID (numbers, e.g. 65532:65532)")
    return int(uid), int(gid)


def hand_over(root: Path, uid: int, gid: int) -> list[Path]:
    """Give ``uid:gid`` the store's root, ``models/`` and each directory directly in
    ``models/`` that is not theirs; return what changed hands (:class:`StoreError` if the
    root is not a directory)."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise StoreError(f"store {root} does not exist (the DaemonSet's hostPath makes it)")\
            from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"store {root} is not a directory")
    models = root / MODELS
    with contextlib.suppress(FileExistsError, PermissionError):
        # possible while root still owns the store (its first start); the agent makes it
        # otherwise (it owns the store by then)
        models.mkdir()
    changed = [p for p in (root, models) if _give(p, uid, gid)]
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(models):
            if entry.is_dir(follow_symlinks=False) and _give(Path(entry.path), uid, gid):
                changed.append(Path(entry.path))
    return changed


def _give(path: Path, uid: int, gid: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or (st.st_uid, st.st_gid) == (uid, gid):
        return False
    os.chown(path, uid, gid, follow_symlinks=False)
    return True

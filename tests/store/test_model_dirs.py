"""Who makes ``models/<key>`` (docs/store.md): the agent claims it before a pod's hostPath is
set up, replaces an empty one someone else made, and the DaemonSet's store-owner step hands
over the store, ``models/`` and what kubelet made in it, following no link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.store.local import Store
from agent.store.owner import hand_over, parse_owner
from common.errors import InvalidInput, StoreError

KEY = "0123456789abcdef01234567"
OTHER_UID = 4321


def test_the_agent_makes_the_directory_a_pod_will_be_bound_to(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old = os.umask(0o077)  # whatever the agent's umask, pods of any uid read it
    try:
        store.claim_model_dir(KEY)
    finally:
        os.umask(old)
    st = os.stat(store.models / KEY)
    assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o755
    assert st.st_uid == os.geteuid()
    inode = st.st_ino
    store.claim_model_dir(KEY)  # again: the same directory, untouched
    assert os.stat(store.models / KEY).st_ino == inode


def test_an_empty_directory_someone_else_made_is_replaced(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    (store.models / KEY).mkdir(parents=True)
    os.chown(store.models / KEY, OTHER_UID, OTHER_UID)  # kubelet's, as far as we are concerned
    store.claim_model_dir(KEY)
    assert os.stat(store.models / KEY).st_uid == os.geteuid()


def test_a_foreign_directory_with_content_is_an_error_naming_its_owner(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    (store.models / KEY).mkdir(parents=True)
    (store.models / KEY / "something").write_text("kept")
    os.chown(store.models / KEY, OTHER_UID, OTHER_UID)
    with pytest.raises(StoreError, match=f"belongs to uid {OTHER_UID}"):
        store.claim_model_dir(KEY)
    assert (store.models / KEY / "something").read_text() == "kept"
    (store.models / ("1" * 24)).write_text("a file")
    with pytest.raises(StoreError, match="not a directory"):
        store.claim_model_dir("1" * 24)


def test_the_store_owner_step_hands_over_what_kubelet_made(tmp_path: Path) -> None:
    root = tmp_path / "store"
    models = root / "models"
    (models / KEY).mkdir(parents=True)
    (models / KEY / "t-0123456789abcdef").mkdir()  # deeper: never touched
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (models / "link").symlink_to(elsewhere)  # never followed
    uid = gid = 65532
    changed = hand_over(root, uid, gid)
    assert changed == [root, models, models / KEY]
    for path in changed:
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (uid, gid)
        assert os.lstat(path).st_mode & 0o777 == 0o755
    assert os.lstat(models / KEY / "t-0123456789abcdef").st_uid == 0
    assert os.stat(elsewhere).st_uid == 0 and os.lstat(models / "link").st_uid == 0
    assert hand_over(root, uid, gid) == []  # nothing more to do at the next start


def test_the_store_owner_step_makes_models_while_root_owns_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    assert hand_over(root, 65532, 65532) == [root, root / "models"]
    with pytest.raises(StoreError, match="does not exist"):
        hand_over(tmp_path / "nowhere", 65532, 65532)
    with pytest.raises(InvalidInput, match="UID:GID"):
        parse_owner("nonroot")

"""Start-up recovery over real store states on disk, and a crash test with a real process."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import agent
from agent.store import blobs as blobs_module
from agent.store.local import Store
from agent.store.recovery import recover
from agent.store.trees import MANIFEST, FileEntry, Manifest, tree_id
from tests.servers.crash import crash_in_child, killed_at, sigkill

REPO = Path(agent.__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("crash_child.py")
KEY = "0123456789abcdef01234567"
Put = Callable[..., FileEntry]


def manifest(files: tuple[FileEntry, ...], key: str = KEY, revision: str = "r1") -> Manifest:
    return Manifest(key=key, uri="hf://org/repo@main", revision=revision, tree="", files=files,
                    created=1_700_000_000.0, last_used=1_700_000_000.0)


def test_tmp_is_emptied(store: Store) -> None:
    (store.tmp / "tree-t-0123-abcd" / "sub").mkdir(parents=True)
    (store.tmp / "tree-t-0123-abcd" / "sub" / "f").write_bytes(b"staged")
    (store.tmp / "manifest-x").write_text("{}")
    (store.tmp / "blob-1-2-3").write_bytes(b"half a blob")
    os.symlink("/etc", store.tmp / "link")
    (store.pulls / f".{KEY}-1234abcd").write_text('{"uri": ')  # a half-written intent
    recover(store)
    assert list(store.tmp.iterdir()) == []
    assert list(store.pulls.iterdir()) == []
    assert Path("/etc").is_dir()


def test_partials_are_kept_only_when_an_intent_names_them(store: Store) -> None:
    for ref in ("wanted", "orphan"):
        (store.partial / ref).mkdir()
        (store.partial / ref / "data").write_bytes(b"partial bytes")
    store.write_intent(KEY, {"uri": "hf://org/repo", "refs": ["wanted"], "blobs": []})
    report = recover(store)
    assert sorted(p.name for p in store.partial.iterdir()) == ["wanted"]
    assert (store.partial / "wanted" / "data").read_bytes() == b"partial bytes"
    assert report.removed_partials == 1 and report.intents == [KEY]


def test_a_tree_without_manifest_is_removed(store: Store, put_blob: Put) -> None:
    published = store.publish(manifest((put_blob(b"x", "a"),)))
    (store.models / KEY / MANIFEST).unlink()
    report = recover(Store(store.root))
    assert report.removed_trees == 1 and report.models == 0
    assert (store.models / KEY).is_dir()
    assert list((store.models / KEY).iterdir()) == []
    assert not store.blobs.exists(published.files[0].blake3)  # no tree links it any more


def test_a_tree_missing_a_file_hides_the_model(store: Store, put_blob: Put) -> None:
    published = store.publish(manifest((put_blob(b"a", "a"), put_blob(b"b", "d/b"))))
    (store.models / KEY / published.tree / "d" / "b").unlink()
    fresh = Store(store.root)
    report = recover(fresh)
    assert report.broken_models == [KEY] and report.models == 0
    assert not (store.models / KEY / MANIFEST).exists()
    assert (store.models / KEY).is_dir()  # a pod's hostPath may be bound to it
    assert fresh.manifest(KEY) is None
    assert store.trees.trees(KEY) == []


def test_a_tree_file_that_is_not_its_blob_hides_the_model(store: Store, put_blob: Put) -> None:
    published = store.publish(manifest((put_blob(b"good", "a"),)))
    path = store.models / KEY / published.tree / "a"
    path.unlink()
    path.write_bytes(b"evil")  # same name, other inode and content
    report = recover(Store(store.root))
    assert report.broken_models == [KEY]
    assert not (store.models / KEY / MANIFEST).exists()


def test_an_unreadable_manifest_hides_the_model(store: Store, put_blob: Put) -> None:
    store.publish(manifest((put_blob(b"a", "a"),)))
    (store.models / KEY / MANIFEST).write_text('{"version": 1, "key": ')
    report = recover(Store(store.root))
    assert report.broken_models == [KEY]
    assert not (store.models / KEY / MANIFEST).exists()


def test_a_manifest_under_another_key_is_refused(store: Store, put_blob: Put) -> None:
    store.publish(manifest((put_blob(b"a", "a"),)))
    other = "f" * 24
    os.rename(store.models / KEY, store.models / other)
    report = recover(Store(store.root))
    assert report.broken_models == [other]


def test_a_lost_blob_name_is_restored_from_the_tree(store: Store, put_blob: Put) -> None:
    entry = put_blob(b"precious" * 100, "w.bin")
    published = store.publish(manifest((entry,)))
    store.blobs.path(entry.blake3).unlink()
    fresh = Store(store.root)
    report = recover(fresh)
    assert report.restored_blob_names == 1 and report.models == 1
    tree_file = store.models / KEY / published.tree / "w.bin"
    assert store.blobs.path(entry.blake3).stat().st_ino == tree_file.stat().st_ino
    assert fresh.manifest(KEY) == published


def test_unreferenced_blobs_go_unless_an_intent_needs_them(store: Store, put_blob: Put) -> None:
    used = put_blob(b"used", "u")
    store.publish(manifest((used,)))
    needed = put_blob(b"needed by a pull in flight")
    garbage = put_blob(b"garbage")
    store.write_intent(KEY, {"uri": "hf://org/repo", "refs": [], "blobs": [needed.blake3]})
    fresh = Store(store.root)
    report = recover(fresh)
    assert store.blobs.exists(used.blake3) and store.blobs.exists(needed.blake3)
    assert not store.blobs.exists(garbage.blake3)
    assert report.removed_blobs == 1
    assert fresh.usage().blobs == report.blobs == 2


def test_older_trees_named_by_the_manifest_are_kept(store: Store, put_blob: Put) -> None:
    v1 = store.publish(manifest((put_blob(b"1", "a"),)))
    v2 = store.publish(manifest((put_blob(b"2", "a"),), revision="r2"))
    stray = store.models / KEY / "t-00000000000000aa"
    stray.mkdir()
    fresh = Store(store.root)
    report = recover(fresh)
    assert sorted(store.trees.trees(KEY)) == sorted([v1.tree, v2.tree])
    assert report.removed_trees == 1 and report.removed_blobs == 0
    assert fresh.manifest(KEY) == v2


def test_recovery_is_idempotent_and_rebuilds_the_index(store: Store, put_blob: Put) -> None:
    a = store.publish(manifest((put_blob(b"x" * 10, "a"), put_blob(b"y" * 20, "b"))))
    fresh = Store(store.root)
    first = recover(fresh)
    second = recover(fresh)
    assert (first.models, first.blobs) == (second.models, second.blobs) == (1, 2)
    assert second.removed_blobs == second.removed_trees == second.removed_partials == 0
    assert fresh.manifests() == [a]
    assert fresh.usage().cache_bytes == 30


def test_a_manifest_cannot_make_recovery_reach_outside_the_store(store: Store, put_blob: Put,
                                                                 tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"node file")
    published = store.publish(manifest((put_blob(b"a", "a"),)))
    data = json.loads((store.models / KEY / MANIFEST).read_text())
    fake = blake3.blake3(b"node file").hexdigest()
    data["files"].append({"path": "../../../../secret", "size": 9, "blake3": fake})
    (store.models / KEY / MANIFEST).write_text(json.dumps(data))
    report = recover(Store(store.root))
    assert secret.stat().st_nlink == 1  # never linked into the store
    assert not store.blobs.exists(fake)
    assert report.broken_models == [KEY] and report.restored_blob_names == 0
    data["files"].pop()
    data["tree"] = "../../../.."
    (store.models / KEY / MANIFEST).write_text(json.dumps(data))
    report = recover(Store(store.root))
    assert report.broken_models == [KEY]
    assert published.tree not in store.trees.trees(KEY)


def test_a_partial_left_linked_to_a_blob_is_never_written_through(store: Store) -> None:
    data = b"committed content" * 100

    def commit_and_die() -> None:
        ingest = store.open_ingest("ref", {"size": len(data), "etag": "v1"})
        (seg,) = ingest.plan(len(data), 1, 1)
        ingest.write(seg, memoryview(data))
        # the process dies after the blob got its name, before cleanup
        killed_at(blobs_module.os, "unlink")
        ingest.commit(store.blobs, len(data), None)

    crash_in_child(commit_and_die)  # its lock dies with it
    digest = blake3.blake3(data).hexdigest()
    assert store.blobs.path(digest).read_bytes() == data
    store.write_intent(KEY, {"uri": "hf://org/repo", "refs": ["ref"], "blobs": []})
    recover(Store(store.root))
    # the same ref again, for content that changed at the source
    again = store.open_ingest("ref", {"size": 5, "etag": "v2"})
    (seg,) = again.plan(5, 1, 1)
    again.write(seg, memoryview(b"other"))
    again.discard()
    assert store.blobs.path(digest).read_bytes() == data


def test_a_partial_whose_data_went_into_the_store_starts_over(store: Store) -> None:
    data = b"0123456789" * 1000
    ident = {"size": len(data), "sha256": None}

    def commit_and_die() -> None:
        ingest = store.open_ingest("ref", ident)
        (seg,) = ingest.plan(len(data), 1, 1)
        ingest.write(seg, memoryview(data))
        ingest.checkpoint()
        # dies after the data moved into blobs/, before the partial is removed
        killed_at(blobs_module, "fsync_dir")
        ingest.commit(store.blobs, len(data), None)

    crash_in_child(commit_and_die)
    store.write_intent(KEY, {"uri": "hf://org/repo", "refs": ["ref"], "blobs": []})
    recover(Store(store.root))
    again = store.open_ingest("ref", ident)
    assert again.resumed_bytes == 0  # the state's claim is about bytes no longer there
    (seg,) = again.plan(len(data), 1, 1)
    again.write(seg, memoryview(data))
    assert again.commit(store.blobs, len(data), None).blake3 == blake3.blake3(data).hexdigest()


# --- crash test: SIGKILL a real writer at random moments ---------------------------------------


def _blake3_file(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _walk_tree(tree: Path) -> list[FileEntry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
            rel = path.relative_to(tree).as_posix()
            entries.append(FileEntry(rel, st.st_size, _blake3_file(path)))
        for name in dirnames:
            assert not (Path(dirpath) / name).is_symlink()
    return entries


def assert_store_invariants(store: Store) -> None:
    assert list(store.tmp.iterdir()) == []
    blobs = list(store.blobs)
    for b in blobs:
        path = store.blobs.path(b.digest)
        assert _blake3_file(path) == b.digest, f"blob {b.digest} does not hold its content"
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    intents = store.intents()
    named = {ref for i in intents.values() for ref in i.get("refs", ())}
    assert {p.name for p in store.partial.iterdir()} <= named
    for key in store.trees.keys():  # noqa: SIM118 (a generator, not a dict)
        model_dir = store.models / key
        m = store.trees.read_manifest(key)
        trees = set(store.trees.trees(key))
        names = {p.name for p in model_dir.iterdir()}
        assert names <= trees | {MANIFEST}, f"stray entries in {model_dir}: {names}"
        if m is None:
            assert trees == set()
            continue
        assert m.tree in trees and set(m.previous) <= trees
        assert trees <= {m.tree, *m.previous}
        for f in m.files:
            path = model_dir / m.tree / f.path
            assert path.stat().st_ino == store.blobs.path(f.blake3).stat().st_ino
            assert path.stat().st_size == f.size
        for tree in trees:
            # a tree's name is the digest of what it holds: nothing in it is partial
            entries = _walk_tree(model_dir / tree)
            assert tree_id(entries) == tree, f"tree {key}/{tree} is incomplete or changed"
            for e in entries:
                blob = store.blobs.path(e.blake3)
                assert blob.stat().st_ino == (model_dir / tree / e.path).stat().st_ino


class StoreMachine(RuleBasedStateMachine):
    """Random sequences of store operations, with recovery in between: the invariants hold
    after every step, and recovery finds exactly the models that were published."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="storemachine-"))
        self.store = Store(self.dir / "store")
        self.store.ensure_layout()
        self.blobs: dict[int, FileEntry] = {}
        self.published: dict[str, Manifest] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(n=st.integers(0, 5))
    def put(self, n: int) -> None:
        writer = self.store.blob_writer()
        writer.write(bytes([n]) * (n * 1000))
        sealed = writer.commit(self.store.blobs, n * 1000)
        self.blobs[n] = FileEntry("x", sealed.size, sealed.blake3)

    @rule(key=st.sampled_from(["a" * 24, "b" * 24]),
          picks=st.lists(st.tuples(st.sampled_from(["c.json", "w/1.bin", "w/2.bin", "t"]),
                                   st.integers(0, 5)), min_size=1, max_size=4,
                         unique_by=lambda t: t[0]))
    def publish(self, key: str, picks: list[tuple[str, int]]) -> None:
        files = []
        for path, n in picks:
            entry = self.blobs.get(n)
            if entry is None or not self.store.blobs.exists(entry.blake3):
                return
            files.append(FileEntry(path, entry.size, entry.blake3))
        self.published[key] = self.store.publish(manifest(tuple(files), key=key))

    @rule(key=st.sampled_from(["a" * 24, "b" * 24]), data=st.data())
    def drop_old_tree(self, key: str, data: st.DataObject) -> None:
        m = self.store.manifest(key)
        if m is None or not m.previous:
            return
        self.store.drop_tree(key, data.draw(st.sampled_from(m.previous)))
        self.published[key] = self.store.manifest(key)  # type: ignore[assignment]

    @rule(key=st.sampled_from(["a" * 24, "b" * 24]))
    def remove(self, key: str) -> None:
        self.store.remove_model(key)
        self.published.pop(key, None)

    @rule()
    def collect(self) -> None:
        for digest in self.store.unreferenced_blobs():
            assert self.store.remove_blob(digest) > 0 or digest == blake3.blake3().hexdigest()

    @rule()
    def restart(self) -> None:
        self.store = Store(self.store.root)
        report = recover(self.store)
        assert report.broken_models == [] and report.removed_trees == 0
        assert {m.key: m for m in self.store.manifests()} == self.published

    @invariant()
    def consistent(self) -> None:
        assert_store_invariants(self.store)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_consistent_store(store: Store) -> None:
    rng = random.Random(20261122)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    totals = {"ops": 0, "models": 0}
    for iteration in range(8):
        with subprocess.Popen([sys.executable, str(CHILD), str(store.root), str(iteration)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as child:
            assert child.stdout is not None and child.stderr is not None
            try:
                for _ in range(rng.randint(3, 40)):
                    line = child.stdout.readline()
                    assert line, f"writer died: {child.stderr.read().decode()[-2000:]}"
                    totals["ops"] += 1
                time.sleep(rng.uniform(0, 0.02))  # land somewhere inside the next operations
                assert child.poll() is None, child.stderr.read().decode()[-2000:]
            finally:
                sigkill(child)
        assert child.returncode == -signal.SIGKILL
        fresh = Store(store.root)
        report = recover(fresh)
        totals["models"] += report.models
        assert_store_invariants(fresh)
        assert {m.key for m in fresh.manifests()} == {
            k for k in fresh.trees.keys()  # noqa: SIM118
            if (fresh.models / k / MANIFEST).exists()}
    assert totals["ops"] > 50 and totals["models"] > 0

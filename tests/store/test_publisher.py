"""Publisher conformance: a model becomes visible whole or not at all, its older trees stay
while named, and pulls in flight are recorded; run against every publisher (see conftest)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from agent.store.modeldir import ModelDir
from agent.store.trees import MANIFEST, FileEntry, Manifest
from common.errors import StoreError, UnsafeName
from tests.store.conftest import KEY, Writable, b3, manifest, put, sha256


def model_dir(publisher: Writable) -> ModelDir:
    """What a pod's side mount would show of ``KEY``: the model's directory, read afresh."""
    return ModelDir(publisher.tree_path(_current(publisher)).parent, KEY)


def _current(publisher: Writable) -> Manifest:
    m = publisher.manifest(KEY)
    assert m is not None
    return m


def files(publisher: Writable, contents: dict[str, bytes]) -> tuple[FileEntry, ...]:
    return tuple(put(publisher, data, path) for path, data in contents.items())


def test_a_published_tree_links_every_file_to_its_blob(publisher: Writable) -> None:
    entries = files(publisher, {"config.json": b"{}", "w/a.bin": b"a" * 5000, "w/b.bin": b""})
    published = publisher.publish(manifest(entries))
    assert published.tree.startswith("t-") and published.files == entries
    tree = publisher.tree_path(published)
    for f in entries:
        path = tree / f.path
        blob = publisher.blob_path(f.blake3)
        assert blob is not None and os.stat(path).st_ino == os.stat(blob).st_ino
    assert publisher.manifest(KEY) == published
    assert [m.key for m in publisher.manifests()] == [KEY]
    on_disk = model_dir(publisher).manifest(KEY)  # the manifest on disk says the same
    assert on_disk is not None and (on_disk.tree, on_disk.files) == (published.tree, entries)


def test_publishing_the_same_files_again_is_the_same_tree(publisher: Writable) -> None:
    entries = files(publisher, {"a": b"one", "b": b"two"})
    first = publisher.publish(manifest(entries))
    again = publisher.publish(manifest(tuple(reversed(entries))))
    assert again.tree == first.tree and again.previous == ()


def test_a_manifest_naming_a_missing_blob_publishes_nothing(publisher: Writable) -> None:
    entries = (*files(publisher, {"a": b"one"}), FileEntry("b", 3, b3(b"never stored")))
    with pytest.raises(StoreError, match="is not in the store"):
        publisher.publish(manifest(entries))
    assert publisher.manifest(KEY) is None and publisher.manifests() == []
    with pytest.raises(StoreError):
        publisher.tree_path(replace(manifest(entries), tree="t-" + "0" * 16))


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", "nul\0name"])
def test_an_unsafe_file_name_publishes_nothing(publisher: Writable, bad: str) -> None:
    (entry,) = files(publisher, {"a": b"one"})
    with pytest.raises(UnsafeName):
        publisher.publish(manifest((entry, replace(entry, path=bad))))
    assert publisher.manifest(KEY) is None


def test_two_spellings_of_one_path_publish_nothing(publisher: Writable) -> None:
    one, two = files(publisher, {"a": b"one", "./a": b"two"})
    with pytest.raises(UnsafeName, match="appears twice"):
        publisher.publish(manifest((one, two)))
    assert publisher.manifest(KEY) is None


def test_a_new_revision_keeps_the_older_trees_named(publisher: Writable) -> None:
    v1 = publisher.publish(manifest(files(publisher, {"cfg": b"v1", "w": b"shared"})))
    v2 = publisher.publish(manifest(files(publisher, {"cfg": b"v2", "w": b"shared"}),
                                    revision="r2"))
    assert v2.previous == (v1.tree,) and publisher.manifest(KEY) == v2
    assert (publisher.tree_path(v1) / "cfg").read_bytes() == b"v1"
    assert (publisher.tree_path(v2) / "cfg").read_bytes() == b"v2"


def test_a_manifest_update_lasts_and_a_removed_model_stays_removed(
        publisher: Writable) -> None:
    published = publisher.publish(manifest(files(publisher, {"a": b"one"})))
    pinned = replace(published, pinned=True, last_used=1_800_000_000.0)
    publisher.update_manifest(pinned)
    assert publisher.manifest(KEY) == pinned
    side = model_dir(publisher)
    on_disk = side.manifest(KEY)
    assert on_disk is not None and on_disk.pinned and on_disk.last_used == 1_800_000_000.0
    tree = publisher.tree_path(published)
    publisher.remove_model(KEY)
    publisher.update_manifest(replace(pinned, pinned=False))
    assert publisher.manifest(KEY) is None
    assert not (tree.parent / MANIFEST).exists()


def test_released_blobs_are_no_longer_held(publisher: Writable) -> None:
    entries = files(publisher, {"a": b"one", "b": b"two"})
    assert {f.blake3 for f in entries} <= publisher.blobs.held()
    publisher.publish(manifest(entries))
    publisher.release(f.blake3 for f in entries)
    assert not {f.blake3 for f in entries} & publisher.blobs.held()


def test_what_is_published_is_known_by_its_stated_digest(publisher: Writable) -> None:
    entries = files(publisher, {"w.bin": b"weights" * 100})
    publisher.publish(manifest(entries))
    assert publisher.knows_stated(sha256(b"weights" * 100), None)
    assert not publisher.knows_stated(sha256(b"other"), None)


def test_pulls_in_flight_are_recorded_until_removed(publisher: Writable) -> None:
    intent = {"uri": "hf://org/tiny@main", "refs": ["sha256-" + "a" * 64], "blobs": []}
    publisher.write_intent(KEY, intent)
    publisher.write_intent("b" * 24, {"uri": "s3://models/x/"})
    assert publisher.intents() == {KEY: intent, "b" * 24: {"uri": "s3://models/x/"}}
    publisher.remove_intent(KEY)
    publisher.remove_intent(KEY)  # already gone: nothing to do
    assert publisher.intents() == {"b" * 24: {"uri": "s3://models/x/"}}

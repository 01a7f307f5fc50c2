"""Provider conformance: every provider reads the same model the same way (see conftest)."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace

import pytest

from common.errors import StoreError
from tests.store.conftest import (
    CONTENTS,
    KEY,
    OTHER,
    ProviderCase,
    b3,
    git_oid,
    publish,
    sha256,
)


def _same(a: object, b: object) -> None:
    """Two manifests of one publication (one may have come back from disk)."""
    fields = ("key", "uri", "revision", "tree", "files", "previous", "pinned")
    assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}


def test_a_published_model_is_provided_by_its_key(provider_case: ProviderCase) -> None:
    got = provider_case.provider.manifest(KEY)
    assert got is not None
    _same(got, provider_case.published)
    listed = {m.key: m for m in provider_case.provider.manifests()}
    assert KEY in listed
    _same(listed[KEY], provider_case.published)
    for key, m in listed.items():  # whatever is listed can be read by its key
        again = provider_case.provider.manifest(key)
        assert again is not None
        _same(again, m)


def test_a_model_not_published_there_is_none(provider_case: ProviderCase) -> None:
    provided = {m.key for m in provider_case.provider.manifests()}
    for key in ("f" * 24, *({OTHER} - provided)):
        assert provider_case.provider.manifest(key) is None


def test_the_tree_holds_every_file_read_only(provider_case: ProviderCase) -> None:
    tree = provider_case.provider.tree_path(provider_case.published)
    found = {p.relative_to(tree).as_posix(): p for p in tree.rglob("*") if p.is_file()}
    assert {path: p.read_bytes() for path, p in found.items()} == CONTENTS
    for p in found.values():
        assert stat.S_IMODE(p.stat().st_mode) == 0o444
    # root writes through file modes: a view mounted read-only refuses the write itself
    if os.statvfs(tree).f_flag & os.ST_RDONLY:
        with pytest.raises(OSError) as info:
            (tree / "config.json").write_bytes(b"changed")
        assert info.value.errno == errno.EROFS
        assert (tree / "config.json").read_bytes() == CONTENTS["config.json"]


def test_a_tree_not_provided_there_is_refused(provider_case: ProviderCase) -> None:
    provider, published = provider_case.provider, provider_case.published
    with pytest.raises(StoreError, match="is not in"):
        provider.tree_path(replace(published, tree="t-0000000000000000"))
    with pytest.raises(StoreError, match="invalid tree"):
        provider.tree_path(replace(published, tree="../../etc"))
    with pytest.raises(StoreError):
        provider.tree_path(replace(published, key="f" * 24))


def test_every_blob_of_the_model_is_read_by_its_digest(provider_case: ProviderCase) -> None:
    for f in provider_case.published.files:
        path = provider_case.provider.blob_path(f.blake3)
        assert path is not None, f.path
        data = path.read_bytes()
        assert data == CONTENTS[f.path] and b3(data) == f.blake3


def test_an_unknown_or_invalid_digest(provider_case: ProviderCase) -> None:
    assert provider_case.provider.blob_path(b3(b"never stored")) is None
    for bad in ("", "ABCDEF" * 11, "../" * 22, b3(b"x")[:63]):
        with pytest.raises(StoreError, match="not a blake3 digest"):
            provider_case.provider.blob_path(bad)


def test_it_knows_the_digests_the_source_stated(provider_case: ProviderCase) -> None:
    provider = provider_case.provider
    shard = CONTENTS["weights/model-00001.safetensors"]
    assert provider.knows_stated(sha256(shard), None)
    assert provider.knows_stated(None, git_oid(CONTENTS["config.json"]))
    assert provider.knows_stated(sha256(b"not stored"), git_oid(CONTENTS["config.json"]))
    assert not provider.knows_stated(sha256(b"not stored"), None)
    assert not provider.knows_stated(None, git_oid(b"not stored"))
    assert not provider.knows_stated(None, None)


def test_a_new_revision_is_provided_and_the_old_tree_stays(provider_case: ProviderCase) -> None:
    old = provider_case.published
    changed = {**CONTENTS, "config.json": b'{"architectures": ["Tiny", "v2"]}'}
    new = publish(provider_case.store, changed, revision="r2")
    got = provider_case.provider.manifest(KEY)
    assert got is not None and got.revision == "r2" and got.tree == new.tree != old.tree
    assert got.previous == (old.tree,)
    new_tree = provider_case.provider.tree_path(got)
    assert (new_tree / "config.json").read_bytes() == changed["config.json"]
    assert (provider_case.provider.tree_path(old) / "config.json").read_bytes() == \
        CONTENTS["config.json"]  # a running pod keeps what it has
    config = provider_case.provider.blob_path(b3(changed["config.json"]))
    assert config is not None and config.read_bytes() == changed["config.json"]


def test_a_removed_model_is_no_longer_provided(provider_case: ProviderCase) -> None:
    provider_case.store.remove_model(KEY)
    assert provider_case.provider.manifest(KEY) is None
    assert KEY not in {m.key for m in provider_case.provider.manifests()}
    with pytest.raises(StoreError):
        provider_case.provider.tree_path(provider_case.published)

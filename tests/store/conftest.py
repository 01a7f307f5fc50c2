"""The store's conformance suite: every implementation of each role (agent/store/roles.py)
passes the same tests, as containerd runs ``core/content/testsuite`` against every content
store and Spegel its ``storetest``.

The ``provider``, ``ingester`` and ``publisher`` fixtures are parametrized over every
implementation of their role; a new implementation is one more entry in ``PROVIDERS``,
``INGESTERS`` or ``PUBLISHERS``:

- ``store``: :class:`~agent.store.local.Store` on the test's directory (every role);
- ``store-recovered``: a second ``Store`` rebuilt from the first one's disk by recovery, as
  the agent finds its store after a restart (the filesystem is the truth);
- ``model-dir``: :class:`~agent.store.modeldir.ModelDir` over one model's directory of that
  store, as the init container reads it;
- ``side-mount``: the same over a real read-only bind mount of that directory, as kubelet
  gives it to the pod (unmounted at teardown).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3
import pytest

from agent.store.local import Store
from agent.store.modeldir import ModelDir
from agent.store.recovery import recover
from agent.store.roles import Ingester, Provider, Publisher
from agent.store.trees import FileEntry, Manifest

KEY = "0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba98"
#: the model every provider case holds: path -> bytes (one file is empty, two share bytes)
CONTENTS = {
    "config.json": b'{"architectures": ["Tiny"]}',
    "weights/model-00001.safetensors": bytes(range(256)) * 1024,
    "weights/model-00002.safetensors": b"\x01" * 70_000,
    "tokenizer/copy.json": b'{"architectures": ["Tiny"]}',
    "empty.txt": b"",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def put(ingester: Ingester, data: bytes, path: str, *, stated: str = "sha256") -> FileEntry:
    """Commit ``data`` through the ingester's sequential writer; the entry states its sha256
    (or, with ``stated="git"``, its git blob id, as Hugging Face does for small files)."""
    writer = ingester.blob_writer()
    writer.write(data)
    sealed = writer.commit(ingester.blobs, len(data))
    digest = sha256(data) if stated == "sha256" else None
    oid = git_oid(data) if stated == "git" else None
    ingester.note_blob(sealed.blake3, sealed.size, digest, oid)
    return FileEntry(path, sealed.size, sealed.blake3, digest, oid)


def manifest(files: tuple[FileEntry, ...], key: str = KEY, revision: str = "r1") -> Manifest:
    return Manifest(key=key, uri="hf://org/tiny@main", revision=revision, tree="", files=files,
                    created=1_700_000_000.0, last_used=1_700_000_000.0)


class Writable(Publisher, Ingester, Protocol):
    """What fills a store: a publisher with an ingester for its blobs."""


def publish(store: Writable, contents: dict[str, bytes], key: str = KEY,
            revision: str = "r1") -> Manifest:
    """Commit and publish a model; the config file states a git blob id, the rest sha256."""
    files = tuple(put(store, data, path, stated="git" if path == "config.json" else "sha256")
                  for path, data in contents.items())
    published = store.publish(manifest(files, key, revision))
    store.release(f.blake3 for f in files)
    return published


def new_store(root: Path) -> Store:
    store = Store(root)
    store.ensure_layout()
    return store


# --- providers ---------------------------------------------------------------------------


@dataclass
class ProviderCase:
    """A provider of the model ``KEY`` (``CONTENTS``, published as ``published``)."""

    provider: Provider
    published: Manifest
    store: Store
    """The store the provider reads: publishes a new revision, removes the model."""


Made = Callable[[Path, list[Path]], ProviderCase]


def _filled(tmp: Path) -> tuple[Store, Manifest]:
    store = new_store(tmp / "store")
    published = publish(store, CONTENTS)
    publish(store, {"other.bin": b"another model"}, key=OTHER)
    return store, published


def _store(tmp: Path, mounts: list[Path]) -> ProviderCase:
    store, published = _filled(tmp)
    return ProviderCase(store, published, store)


def _recovered(tmp: Path, mounts: list[Path]) -> ProviderCase:
    first, published = _filled(tmp)
    again = Store(first.root)
    recover(again)
    return ProviderCase(again, published, again)


def _model_dir(tmp: Path, mounts: list[Path]) -> ProviderCase:
    store, published = _filled(tmp)
    return ProviderCase(ModelDir(store.models / KEY, KEY), published, store)


def _side_mount(tmp: Path, mounts: list[Path]) -> ProviderCase:
    store, published = _filled(tmp)
    side = tmp / "pod" / "side"
    side.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(store.models / KEY), str(side)], check=True)
    mounts.append(side)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(side)], check=True)
    return ProviderCase(ModelDir(side, KEY), published, store)


PROVIDERS: dict[str, Made] = {"store": _store, "store-recovered": _recovered,
                              "model-dir": _model_dir, "side-mount": _side_mount}


@pytest.fixture(params=sorted(PROVIDERS))
def provider_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProviderCase]:
    mounts: list[Path] = []
    try:
        yield PROVIDERS[request.param](tmp_path, mounts)
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", str(target)], check=True)


# --- ingesters and publishers ------------------------------------------------------------


INGESTERS: dict[str, Callable[[Path], Ingester]] = {"store": new_store}
#: each publisher with the ingester that commits its blobs
PUBLISHERS: dict[str, Callable[[Path], Writable]] = {"store": new_store}


@pytest.fixture(params=sorted(INGESTERS))
def ingester(request: pytest.FixtureRequest, tmp_path: Path) -> Ingester:
    return INGESTERS[request.param](tmp_path / "store")


@pytest.fixture(params=sorted(PUBLISHERS))
def publisher(request: pytest.FixtureRequest, tmp_path: Path) -> Writable:
    return PUBLISHERS[request.param](tmp_path / "store")

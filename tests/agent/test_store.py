"""The store's lower layers: blobs, ingest (resumable, locked, verified), trees and usage."""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import random
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import blake3
import pytest

import agent
from agent.store import trees as trees_module
from agent.store.blobs import BlobStore
from agent.store.ingest import Ingest
from agent.store.local import Store
from agent.store.recovery import recover
from agent.store.segments import Segment
from agent.store.trees import MANIFEST, WHITEOUT, FileEntry, Manifest, apply_whiteout, tree_id
from common.errors import IntegrityError, Locked, StoreError, UnsafeName
from tests.servers.crash import crash_in_child, killed_at, sigkill

REPO = Path(agent.__file__).resolve().parents[1]
KEY = "0123456789abcdef01234567"
KEY2 = "fedcba9876543210fedcba98"
Put = Callable[..., FileEntry]


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged(store: Store, data: bytes, name: str = "src") -> Path:
    path = store.tmp / name
    path.write_bytes(data)
    return path


def manifest(files: tuple[FileEntry, ...], key: str = KEY, revision: str = "r1") -> Manifest:
    return Manifest(key=key, uri="hf://org/repo@main", revision=revision, tree="", files=files,
                    created=1_700_000_000.0, last_used=1_700_000_000.0)


# --- BlobStore ---------------------------------------------------------------------------------


def test_commit_makes_a_read_only_blob_named_by_blake3(store: Store) -> None:
    data = b"weights" * 1000
    src = staged(store, data)
    assert store.blobs.commit(src, b3(data)) is True
    path = store.blobs.path(b3(data))
    assert path == store.root / "blobs" / b3(data)[:2] / b3(data)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not src.exists()
    info = store.blobs.info(b3(data))
    assert info is not None and (info.size, info.refs) == (len(data), 0)
    assert [b.digest for b in store.blobs] == [b3(data)]


def test_committing_existing_content_succeeds_and_keeps_the_inode(store: Store) -> None:
    data = b"same content"
    store.blobs.commit(staged(store, data, "a"), b3(data))
    inode = store.blobs.path(b3(data)).stat().st_ino
    again = staged(store, data, "b")
    assert store.blobs.commit(again, b3(data)) is False
    assert store.blobs.path(b3(data)).stat().st_ino == inode
    assert not again.exists()
    assert len(list(store.blobs)) == 1


def test_blob_path_refuses_what_is_not_a_digest(store: Store) -> None:
    for bad in ("", "../../etc/passwd", "AB" * 32, "a" * 63, "g" * 64, "a" * 64 + "/x"):
        with pytest.raises(StoreError, match="not a blake3 digest"):
            store.blobs.path(bad)


def test_remove_reports_freed_bytes_truthfully(store: Store, put_blob: Put) -> None:
    lone = put_blob(b"x" * 100)
    linked = put_blob(b"y" * 200, "y.bin")
    store.publish(manifest((linked,)))
    assert store.blobs.info(linked.blake3).refs == 1  # type: ignore[union-attr]
    assert store.blobs.remove(lone.blake3) == 100
    assert store.blobs.remove(linked.blake3) == 0  # a tree still holds the bytes
    assert not store.blobs.exists(linked.blake3)
    assert store.blobs.remove(lone.blake3) == 0  # already gone


def test_blob_iteration_skips_foreign_names(store: Store, put_blob: Put) -> None:
    good = put_blob(b"good")
    shard = store.blobs.root / good.blake3[:2]
    (shard / "not-a-digest").write_bytes(b"x")
    (shard / ("0" * 64)).write_bytes(b"wrong shard")
    (store.blobs.root / "zzz").mkdir()
    assert [b.digest for b in BlobStore(store.blobs.root)] == [good.blake3]


MIB = 1024 * 1024

# --- Ingest ----------------------------------------------------------------------------------


def identity(data: bytes, **extra: object) -> dict[str, object]:
    return {"url": "http://127.0.0.1/x", "size": len(data), "sha256": sha(data), **extra}


def test_plan_splits_into_contiguous_segments(store: Store) -> None:
    mib = 1024 * 1024
    size = 8 * mib + 1000
    ingest = store.open_ingest("ref", {"size": size})
    try:
        segs = ingest.plan(size, parts=4, min_part=mib)
        assert len(segs) == 4
        assert segs[0].start == 0 and segs[-1].end == size
        assert all(a.end == b.start for a, b in itertools.pairwise(segs))
        # boundaries on 1 MiB, so that full chunks can be written O_DIRECT
        assert all(s.start % mib == 0 for s in segs)
        assert os.fstat(ingest.fd).st_size == size  # preallocated
        assert len(ingest.plan(size, parts=4, min_part=6 * mib)) == 4  # same plan is kept
    finally:
        ingest.discard()
    small = store.open_ingest("small", {"size": 1000})
    try:
        assert len(small.plan(1000, parts=8, min_part=400)) == 1  # no segment under 1 MiB
        assert len(small.plan(8 * mib, parts=8, min_part=3 * mib)) == 2  # min_part bounds it
        assert [(s.start, s.end) for s in small.plan(None, 4, 1)] == [(0, None)]
        empty = small.plan(0, 4, 1)
        assert [(s.start, s.end) for s in empty] == [(0, 0)] and empty[0].complete
    finally:
        small.discard()


def _write_aligned(ingest: Ingest, seg: Segment, data: bytes) -> None:
    """Write a segment as the fetch engine does: whole page-aligned buffers (O_DIRECT)."""
    buf = memoryview(mmap.mmap(-1, MIB))
    while not seg.complete:
        n = min(MIB, (seg.end or 0) - seg.offset)
        buf[:n] = data[seg.offset: seg.offset + n]
        pending = ingest.write(seg, buf[:n])
        if pending is not None:
            pending.wait()


def test_a_slow_file_is_fetched_in_pieces_in_order(store: Store) -> None:
    data = random.Random(2).randbytes(40 * MIB + 123)
    ingest = store.open_ingest("pieces", identity(data))
    (first,) = ingest.plan(len(data), parts=1, min_part=MIB)
    assert ingest.take_piece(4 * MIB) is None, "no pool before the file is split"
    buf = memoryview(mmap.mmap(-1, 3 * MIB))
    buf[:] = data[: 3 * MIB]
    ingest.write(first, buf)
    assert ingest.pool_rest(first, MIB + 5, min_part=MIB)
    assert first.end == 5 * MIB, "the running stream keeps what it may have in flight"
    assert not ingest.pool_rest(first, MIB, min_part=MIB), "one pool per file"
    pieces = []
    while (piece := ingest.take_piece(4 * MIB)) is not None:
        pieces.append(piece)
    spans = [(p.start, p.end) for p in pieces]
    assert spans[0][0] == 5 * MIB and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), "in file order, no gap"
    sizes = [b - a for a, b in spans]
    assert sizes[0] == 4 * MIB and min(sizes) < 4 * MIB, "smaller pieces at the end"
    assert all(a % MIB == 0 for a, _ in spans)
    ingest.start_hasher()
    # pieces land out of order (the last first), each written and read back O_DIRECT
    for seg in [*reversed(pieces), first]:
        _write_aligned(ingest, seg, data)
    ingest.checkpoint()
    state = json.loads((ingest.dir / "state.json").read_text())
    assert state["segments"] == [[0, len(data), len(data)]], "complete pieces merged"
    assert [(s.start, s.end) for s in ingest.segments] == [(0, len(data))], "in memory too"
    sealed = ingest.commit(store.blobs, len(data), sha(data))
    assert sealed.blake3 == blake3.blake3(data).hexdigest()


def test_a_pooled_file_resumes_as_ordinary_segments(store: Store) -> None:
    data = random.Random(3).randbytes(12 * MIB)
    ingest = store.open_ingest("pooled", identity(data))
    (first,) = ingest.plan(len(data), parts=1, min_part=MIB)
    assert ingest.pool_rest(first, MIB, min_part=MIB)
    piece = ingest.take_piece(2 * MIB)
    assert piece is not None
    _write_aligned(ingest, piece, data)
    ingest.checkpoint()
    ingest.close()
    again = store.open_ingest("pooled", identity(data))
    try:
        assert [(s.start, s.end, s.done, s.pooled) for s in again.segments] == [
            (0, MIB, 0, False), (MIB, 3 * MIB, 2 * MIB, False), (3 * MIB, 12 * MIB, 0, False)]
        assert again.take_piece(MIB) is None, "a resumed file pools again only when split"
    finally:
        again.discard()


def _write_segment(ingest: Ingest, seg: Segment, data: bytes, rng: random.Random) -> None:
    while not seg.complete:
        n = rng.randint(1, 70_000)
        ingest.write(seg, memoryview(data[seg.offset: min(seg.offset + n, seg.end or 0)]))


def test_out_of_order_writes_from_threads_hash_right(store: Store) -> None:
    data = random.Random(1).randbytes(6 * 1024 * 1024 + 17)
    ingest = store.open_ingest("ooo", identity(data))
    segs = ingest.plan(len(data), parts=6, min_part=256 * 1024)
    assert len(segs) == 6
    ingest.start_hasher()
    # segment i starts only once segment i+1 is complete: they finish last to first
    done = [threading.Event() for _ in segs]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            if i + 1 < len(segs):
                assert done[i + 1].wait(10)
            _write_segment(ingest, segs[i], data, random.Random(i))
            done[i].set()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            done[i].set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(segs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    sealed = ingest.commit(store.blobs, len(data), sha(data))
    assert (sealed.blake3, sealed.sha256, sealed.size) == (b3(data), sha(data), len(data))
    assert store.blobs.path(b3(data)).read_bytes() == data
    assert not (store.partial / "ooo").exists()


def test_free_running_threads_hash_right(store: Store) -> None:
    data = random.Random(2).randbytes(2 * 1024 * 1024 + 3)
    ingest = store.open_ingest("free", identity(data))
    segs = ingest.plan(len(data), parts=5, min_part=64 * 1024)
    threads = [threading.Thread(target=_write_segment, args=(ingest, s, data, random.Random(i)))
               for i, s in enumerate(segs)]
    for t in reversed(threads):
        t.start()
    ingest.start_hasher()
    for t in threads:
        t.join(10)
    sealed = ingest.commit(store.blobs, len(data), sha(data))
    assert sealed.blake3 == b3(data)


def test_stream_of_unknown_size(store: Store) -> None:
    data = b"streamed" * 5000
    ingest = store.open_ingest("stream", {"url": "u", "size": None})
    (seg,) = ingest.plan(None, parts=4, min_part=1)
    ingest.start_hasher()
    for i in range(0, len(data), 7000):
        ingest.write(seg, memoryview(data[i:i + 7000]))
    ingest.mark_complete()
    sealed = ingest.commit(store.blobs, None, None)
    assert (sealed.size, sealed.blake3, sealed.sha256) == (len(data), b3(data), None)


def test_empty_file(store: Store) -> None:
    ingest = store.open_ingest("empty", identity(b""))
    ingest.plan(0, parts=4, min_part=1)
    sealed = ingest.commit(store.blobs, 0, sha(b""))
    assert sealed.blake3 == b3(b"") and store.blobs.path(b3(b"")).read_bytes() == b""


def test_a_segment_cannot_overflow(store: Store) -> None:
    ingest = store.open_ingest("over", {"size": 10})
    try:
        (seg,) = ingest.plan(10, 1, 1)
        ingest.write(seg, memoryview(b"12345678"))
        with pytest.raises(IntegrityError, match="more bytes than the range 0-9"):
            ingest.write(seg, memoryview(b"abc"))
        with pytest.raises(StoreError, match="not complete"):
            ingest.seal(10, None)
    finally:
        ingest.discard()


def _complete(store: Store, ref: str, data: bytes, ident: dict[str, object]) -> Ingest:
    ingest = store.open_ingest(ref, ident)
    (seg,) = ingest.plan(len(data), 1, 1)
    ingest.write(seg, memoryview(data))
    return ingest


def test_seal_rejects_a_wrong_size(store: Store) -> None:
    data = b"0123456789"
    ingest = _complete(store, "size", data, identity(data))
    with pytest.raises(IntegrityError, match="expected 11 bytes, got 10"):
        ingest.commit(store.blobs, 11, sha(data))
    assert list(store.blobs) == []
    ingest.discard()
    assert not (store.partial / "size").exists()


def test_a_wrong_sha256_is_never_committed(store: Store) -> None:
    data = b"the real bytes"
    lie = sha(b"what the source claimed")
    ingest = _complete(store, "sha", data, identity(data, sha256=lie))
    with pytest.raises(IntegrityError) as info:
        ingest.commit(store.blobs, len(data), lie)
    assert lie in str(info.value) and sha(data) in str(info.value)
    assert list(store.blobs) == []
    assert not store.blobs.exists(b3(data))
    ingest.discard()
    assert list(store.partial.iterdir()) == []


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def test_a_git_blob_id_is_checked_and_indexed(store: Store) -> None:
    """A file kept in git: its blob id is hashed in the same pass (from out-of-order
    writes too), a wrong one is never committed, and the store finds the content by it,
    also after a restart (from the manifests)."""
    data = random.Random(5).randbytes(3 * MIB + 17)
    ident = {"url": "http://127.0.0.1/x", "size": len(data), "git_oid": git_oid(data)}
    lie = git_oid(b"what the source claimed")
    ingest = _complete(store, "git-lie", data, {**ident, "git_oid": lie})
    with pytest.raises(IntegrityError, match=f"git blob id mismatch: the source stated {lie}, "
                                             f"the bytes are {git_oid(data)}"):
        ingest.commit(store.blobs, len(data), None, expected_git_oid=lie)
    ingest.discard()
    assert list(store.blobs) == []

    ingest = store.open_ingest("git", ident)
    segments = ingest.plan(len(data), 3, 1)
    for seg in reversed(segments):
        _write_segment(ingest, seg, data, random.Random(seg.offset))
    sealed = ingest.commit(store.blobs, len(data), None, expected_git_oid=git_oid(data))
    assert (sealed.blake3, sealed.sha256, sealed.git_oid) == (b3(data), None, git_oid(data))
    store.note_blob(sealed.blake3, sealed.size, sealed.sha256, sealed.git_oid)
    assert store.knows_stated(None, git_oid(data)) and not store.knows_stated(sha(data), None)
    assert store.find_stated(None, git_oid(data)) == (b3(data), len(data))
    store.blobs.release([b3(data), b3(data)])

    entry = FileEntry("tokenizer.json", len(data), b3(data), None, git_oid(data))
    store.publish(manifest((entry,)))
    fresh = Store(store.root)
    recover(fresh)
    assert fresh.manifest(KEY).files == (entry,)  # type: ignore[union-attr]
    assert fresh.find_stated(None, git_oid(data)) == (b3(data), len(data))
    assert fresh.find_sha256(git_oid(data)) is None, "the two kinds of digest never mix"


def test_close_then_open_resumes(store: Store) -> None:
    data = random.Random(3).randbytes(4 * 1024 * 1024)
    ident = identity(data)
    ingest = store.open_ingest("resume", ident)
    segs = ingest.plan(len(data), parts=4, min_part=1024)
    assert len(segs) == 4
    ingest.write(segs[0], memoryview(data[: segs[0].end]))  # one whole segment
    ingest.write(segs[2], memoryview(data[segs[2].start: segs[2].start + 1000]))  # part of one
    ingest.close()

    again = store.open_ingest("resume", ident)
    assert again.resumed_bytes == segs[0].end + 1000  # type: ignore[operator]
    segs2 = again.plan(len(data), parts=4, min_part=1024)
    assert [(s.start, s.end, s.done) for s in segs2] == [(s.start, s.end, s.done) for s in segs]
    for s in segs2:
        _write_segment(again, s, data, random.Random(0))
    sealed = again.commit(store.blobs, len(data), sha(data))
    assert sealed.blake3 == b3(data) and sealed.sha256 == sha(data)


_CRASHER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from agent.store.local import Store
    data = Path(sys.argv[2]).read_bytes()
    ident = {"url": "u", "size": len(data), "sha256": sys.argv[3]}
    ingest = Store(Path(sys.argv[1])).open_ingest("crash", ident)
    (seg,) = ingest.plan(len(data), 1, 1)
    ingest.write(seg, memoryview(data[:300_000]))
    ingest.checkpoint()
    ingest.write(seg, memoryview(data[300_000:500_000]))
    os._exit(0)  # dies without closing: what was not checkpointed is not claimed
""")


def test_resume_after_a_crash_claims_only_what_was_checkpointed(store: Store,
                                                                tmp_path: Path) -> None:
    data = random.Random(4).randbytes(800_000)
    (tmp_path / "data").write_bytes(data)
    subprocess.run([sys.executable, "-c", _CRASHER, str(store.root), str(tmp_path / "data"),
                    sha(data)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                   timeout=60)
    ingest = store.open_ingest("crash", {"url": "u", "size": len(data), "sha256": sha(data)})
    assert ingest.resumed_bytes == 300_000
    (seg,) = ingest.plan(len(data), 1, 1)
    assert seg.offset == 300_000
    ingest.write(seg, memoryview(data[300_000:]))
    assert ingest.commit(store.blobs, len(data), sha(data)).blake3 == b3(data)


def test_a_new_identity_starts_over(store: Store) -> None:
    data = b"a" * 5000
    ingest = store.open_ingest("ident", identity(data, etag='"v1"'))
    (seg,) = ingest.plan(len(data), 1, 1)
    ingest.write(seg, memoryview(data[:4000]))
    ingest.close()
    changed = store.open_ingest("ident", identity(data, etag='"v2"'))
    try:
        assert changed.resumed_bytes == 0
        assert changed.segments == []
        assert os.fstat(changed.fd).st_size == 0  # the old bytes are gone
    finally:
        changed.discard()


def test_a_second_writer_is_locked_out(store: Store) -> None:
    first = store.open_ingest("locked", {"size": 1})
    with pytest.raises(Locked) as info:
        store.open_ingest("locked", {"size": 1})
    assert "locked since" in str(info.value)
    assert f"pid {os.getpid()}" in str(info.value)
    first.close()
    store.open_ingest("locked", {"size": 1}).discard()  # free again once closed


_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from agent.store.local import Store
    ingest = Store(Path(sys.argv[1])).open_ingest("held", {"size": 1})
    print("holding", flush=True)
    sys.stdin.read()
""")


def test_the_lock_holds_across_processes_and_dies_with_its_holder(store: Store) -> None:
    with subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.root)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "holding\n"
            with pytest.raises(Locked, match=f"locked since .* by pid {child.pid}"):
                store.open_ingest("held", {"size": 1})
        finally:
            sigkill(child)  # no unlock, no cleanup: the kernel drops the flock
    store.open_ingest("held", {"size": 1}).discard()


# --- BlobWriter --------------------------------------------------------------------------------


def test_blob_writer_commits_verified_content(store: Store) -> None:
    data = b"sequential " * 10_000
    writer = store.blob_writer(sha(data))
    for i in range(0, len(data), 4096):
        writer.write(data[i:i + 4096])
    sealed = writer.commit(store.blobs, len(data))
    assert (sealed.blake3, sealed.sha256, sealed.size) == (b3(data), sha(data), len(data))
    assert sealed.path == store.blobs.path(b3(data))
    assert stat.S_IMODE(sealed.path.stat().st_mode) == 0o444
    assert list(store.tmp.iterdir()) == []


def test_blob_writer_of_existing_content_keeps_the_blob(store: Store, put_blob: Put) -> None:
    entry = put_blob(b"dup")
    inode = store.blobs.path(entry.blake3).stat().st_ino
    writer = store.blob_writer()
    writer.write(b"dup")
    assert writer.commit(store.blobs, 3).blake3 == entry.blake3
    assert store.blobs.path(entry.blake3).stat().st_ino == inode
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize(("expected_sha", "size", "says"), [
    ("0" * 64, None, "sha256 mismatch"),
    (None, 4, "size mismatch: expected 4 bytes, got 5"),
])
def test_blob_writer_refuses_wrong_content(store: Store, expected_sha: str | None,
                                           size: int | None, says: str) -> None:
    writer = store.blob_writer(expected_sha)
    writer.write(b"hello")
    with pytest.raises(IntegrityError, match=says):
        writer.commit(store.blobs, size)
    assert list(store.blobs) == []
    assert list(store.tmp.iterdir()) == []


def test_blob_writer_abort_leaves_nothing(store: Store) -> None:
    writer = store.blob_writer()
    writer.write(b"half")
    writer.abort()
    assert list(store.tmp.iterdir()) == [] and list(store.blobs) == []


# --- trees and manifests -----------------------------------------------------------------------


def _files(put_blob: Put, contents: dict[str, bytes]) -> tuple[FileEntry, ...]:
    return tuple(put_blob(data, path) for path, data in contents.items())


def test_publish_links_every_file_to_its_blob(store: Store, put_blob: Put) -> None:
    files = _files(put_blob, {"config.json": b"{}", "w/a.safetensors": b"A" * 1000,
                              "w/b.safetensors": b"B" * 2000})
    published = store.publish(manifest(files))
    assert published.tree == tree_id(files)
    tree = store.models / KEY / published.tree
    for f in files:
        path = tree / f.path
        assert path.stat().st_ino == store.blobs.path(f.blake3).stat().st_ino
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert store.blobs.info(f.blake3).refs == 1  # type: ignore[union-attr]
    on_disk = json.loads((store.models / KEY / MANIFEST).read_text())
    assert on_disk["tree"] == published.tree and on_disk["size_bytes"] == 3002
    assert on_disk["version"] == 1 and on_disk["key"] == KEY
    assert [f["path"] for f in on_disk["files"]] == [f.path for f in files]
    assert Manifest.from_json(on_disk) == published
    assert store.trees.read_manifest(KEY) == published
    assert list(store.tmp.iterdir()) == []


def test_a_tree_is_visible_only_complete(store: Store, put_blob: Put,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(put_blob, {f"f{i}": bytes([i]) * 10 for i in range(5)})
    real_link = os.link
    calls = 0

    def failing_link(src: object, dst: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        real_link(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(trees_module.os, "link", failing_link)
    with pytest.raises(OSError):
        store.publish(manifest(files))
    monkeypatch.undo()
    assert store.trees.trees(KEY) == []
    assert not (store.models / KEY / MANIFEST).exists()
    assert list(store.tmp.iterdir()) == []
    assert all(store.blobs.info(f.blake3).refs == 0 for f in files)  # type: ignore[union-attr]


def test_publish_refuses_a_missing_blob(store: Store, put_blob: Put) -> None:
    files = (*_files(put_blob, {"a": b"a"}), FileEntry("b", 1, b3(b"not stored")))
    with pytest.raises(StoreError, match="is not in the store"):
        store.publish(manifest(files))
    assert store.trees.trees(KEY) == [] and list(store.tmp.iterdir()) == []


def test_publish_refuses_clashing_paths(store: Store, put_blob: Put) -> None:
    a = put_blob(b"a", "a")
    with pytest.raises(UnsafeName, match=r"'\.\./escape' contains '\.\.'"):
        store.publish(manifest((a, replace(a, path="../escape"))))
    with pytest.raises(UnsafeName, match="both a file and a directory"):
        store.publish(manifest((a, replace(a, path="a/b"))))
    assert not (store.root / "escape").exists() and not (store.models / "escape").exists()
    assert store.trees.trees(KEY) == [] and list(store.tmp.iterdir()) == []


def test_the_manifest_is_replaced_atomically(store: Store, put_blob: Put,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = store.publish(manifest(_files(put_blob, {"a": b"one"})))
    before = (store.models / KEY / MANIFEST).read_bytes()

    def crash(*args: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(trees_module.os, "replace", crash)
    with pytest.raises(OSError):
        store.publish(manifest(_files(put_blob, {"a": b"two"}), revision="r2"))
    monkeypatch.undo()
    assert (store.models / KEY / MANIFEST).read_bytes() == before
    assert store.trees.read_manifest(KEY) == v1


def test_republishing_the_same_content_changes_nothing(store: Store, put_blob: Put) -> None:
    files = _files(put_blob, {"a": b"A", "d/b": b"B"})
    first = store.publish(manifest(files))
    tree = store.models / KEY / first.tree
    inodes = {p: p.stat().st_ino for p in [tree, *tree.rglob("*")]}
    again = store.publish(manifest(files, revision="r1"))
    assert again.tree == first.tree and again.previous == ()
    assert {p: p.stat().st_ino for p in [tree, *tree.rglob("*")]} == inodes
    assert store.trees.trees(KEY) == [first.tree]
    assert all(store.blobs.info(f.blake3).refs == 1 for f in files)  # type: ignore[union-attr]


def test_a_new_revision_is_a_new_tree_and_the_old_one_stays(store: Store,
                                                             put_blob: Put) -> None:
    shared = put_blob(b"shared shard" * 100, "s.bin")
    v1 = store.publish(manifest((shared, put_blob(b"cfg v1", "config.json"))))
    old_config = store.models / KEY / v1.tree / "config.json"
    old_inode = old_config.stat().st_ino
    v2 = store.publish(manifest((shared, put_blob(b"cfg v2", "config.json")), revision="r2"))
    assert v2.tree != v1.tree and v2.previous == (v1.tree,)
    assert old_config.read_bytes() == b"cfg v1" and old_config.stat().st_ino == old_inode
    assert store.blobs.info(shared.blake3).refs == 2  # type: ignore[union-attr]
    v3 = store.publish(manifest((shared,), revision="r3"))
    assert v3.previous == (v1.tree, v2.tree)
    back = store.publish(manifest(v1.files, revision="r1"))
    assert back.tree == v1.tree and back.previous == (v2.tree, v3.tree)
    assert store.trees.read_manifest(KEY) == back
    # an older tree goes only on request, never the current one
    with pytest.raises(StoreError, match="current tree"):
        store.drop_tree(KEY, v1.tree)
    store.drop_tree(KEY, v2.tree)
    assert store.trees.read_manifest(KEY).previous == (v3.tree,)  # type: ignore[union-attr]
    assert sorted(store.trees.trees(KEY)) == sorted([v1.tree, v3.tree])


def test_a_crash_while_publishing_a_revision_keeps_the_old_tree(
        store: Store, put_blob: Put) -> None:
    v1 = store.publish(manifest(_files(put_blob, {"a": b"one"})))
    v2 = manifest(_files(put_blob, {"a": b"two"}), revision="r2")

    def publish_then_die() -> None:
        # the process dies right after the first manifest write
        killed_at(trees_module.Trees, "write_manifest", after=True)
        store.publish(v2)

    crash_in_child(publish_then_die)
    recover(Store(store.root))
    assert (store.models / KEY / v1.tree / "a").read_bytes() == b"one"


@pytest.mark.parametrize("step", ["remove_tree", "write_manifest"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_while_dropping_an_old_tree_leaves_no_dangling_name(
        store: Store, put_blob: Put, step: str, when: str) -> None:
    v1 = store.publish(manifest(_files(put_blob, {"a": b"one"})))
    v2 = store.publish(manifest(_files(put_blob, {"a": b"two"}), revision="r2"))

    def drop_and_die() -> None:
        killed_at(trees_module.Trees, step, after=when == "after")
        store.drop_tree(KEY, v1.tree)

    crash_in_child(drop_and_die)
    fresh = Store(store.root)
    recover(fresh)
    m = fresh.manifest(KEY)
    assert m is not None and m.tree == v2.tree
    on_disk = set(fresh.trees.trees(KEY))
    assert set(m.previous) <= on_disk, "the manifest names a tree that is gone"
    assert on_disk == {v2.tree, *m.previous}


def test_remove_model_hides_it_but_keeps_its_directory(store: Store, put_blob: Put) -> None:
    v1 = store.publish(manifest(_files(put_blob, {"a": b"1"})))
    store.publish(manifest(_files(put_blob, {"a": b"2"}), revision="r2"))
    store.remove_model(KEY)
    assert (store.models / KEY).is_dir()
    assert list((store.models / KEY).iterdir()) == []
    assert store.manifest(KEY) is None and store.trees.read_manifest(KEY) is None
    assert store.blobs.info(v1.files[0].blake3).refs == 0  # type: ignore[union-attr]


def test_invalid_model_keys_are_refused(store: Store) -> None:
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(StoreError, match="invalid model key"):
            store.trees.model_dir(bad)


# --- accounting and lookups --------------------------------------------------------------------


def test_usage_counts_shared_blobs_once(store: Store, put_blob: Put) -> None:
    shard1, shard2 = b"1" * 4000, b"2" * 3000
    a = store.publish(manifest((put_blob(shard1, "s1"), put_blob(shard2, "s2"),
                                put_blob(b"a" * 100, "cfg")), key=KEY))
    b = store.publish(manifest((put_blob(shard1, "x/s1"), put_blob(shard2, "x/s2"),
                                put_blob(b"b" * 50, "cfg")), key=KEY2))
    usage = store.usage()
    assert usage.blobs == 4
    assert usage.cache_bytes == 4000 + 3000 + 100 + 50
    assert usage.dedup_saved_bytes == 7000
    assert a.size_bytes + b.size_bytes - usage.cache_bytes == usage.dedup_saved_bytes
    assert 0 < usage.free_bytes <= usage.capacity_bytes
    assert 0 < usage.used_bytes <= usage.capacity_bytes
    # the index rebuilt from disk gives the same accounting
    fresh = Store(store.root)
    recover(fresh)
    again = fresh.usage()
    assert (again.blobs, again.cache_bytes, again.dedup_saved_bytes) == (4, 7150, 7000)


def test_find_sha256_knows_committed_content(store: Store) -> None:
    data = b"stated digest"
    writer = store.blob_writer(sha(data))
    writer.write(data)
    sealed = writer.commit(store.blobs, len(data))
    store.note_blob(sealed.blake3, sealed.size, sealed.sha256)
    assert store.find_sha256(sha(data)) == (b3(data), len(data))
    assert store.has_blob(b3(data), len(data)) and not store.has_blob(b3(data), 1)
    # committed and found: held twice, so garbage collection leaves it alone
    assert store.unreferenced_blobs() == []
    assert store.remove_blob(b3(data)) == 0 and store.blobs.exists(b3(data))
    store.blobs.release([b3(data), b3(data)])
    assert store.unreferenced_blobs() == [b3(data)]
    assert store.remove_blob(b3(data)) == len(data)
    assert store.find_sha256(sha(data)) is None


def test_two_spellings_of_one_path_are_one_path(store: Store, put_blob: Put) -> None:
    a, b = put_blob(b"first", "a"), put_blob(b"second", "./a")
    with pytest.raises(UnsafeName, match="'a' appears twice"):
        store.publish(manifest((a, b)))
    assert store.trees.trees(KEY) == [] and list(store.tmp.iterdir()) == []
    published = store.publish(manifest((b,)))
    assert [f.path for f in published.files] == ["a"]  # the manifest holds the clean name
    assert published.tree == tree_id((replace(b, path="a"),))


@pytest.mark.parametrize("ref", ["../escape", "a/b", "..", ".", "", "x\x00y",
                                 "sha256-../../../../tmp/evil", "x" * 300])
def test_an_ingest_ref_cannot_name_a_path(store: Store, tmp_path: Path, ref: str) -> None:
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(StoreError, match="not a valid ingest ref"):
        store.open_ingest(ref, {"size": 1})
    with pytest.raises(StoreError, match="not a valid ingest ref"):
        store.remove_partial(ref)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert store.root.is_dir()


def test_whiteouts_delete_from_the_layers_below() -> None:
    def tree(*paths: str) -> dict[str, FileEntry]:
        return {p: FileEntry(p, 1, "b" * 64) for p in paths}

    below = tree("a.bin", "ab.bin", "d/x", "d/e/y", "dd/z", "keep")
    apply_whiteout(below, ".wh.a.bin")
    apply_whiteout(below, "d/.wh.e")  # a directory, whole
    apply_whiteout(below, ".wh.missing")  # nothing to delete: no error
    assert sorted(below) == ["ab.bin", "d/x", "dd/z", "keep"]
    apply_whiteout(below, "d/.wh..wh..opq")  # d emptied; dd (a sibling) untouched
    assert sorted(below) == ["ab.bin", "dd/z", "keep"]
    apply_whiteout(below, ".wh..wh..opq")  # the root itself
    assert below == {}
    assert FileEntry(".wh.x", 0, WHITEOUT).whiteout and not FileEntry("x", 1, "b").whiteout

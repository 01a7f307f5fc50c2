"""Ingester conformance: resumable, locked, verified writes that commit by size and digest
(containerd's ingest protocol), run against every ingester (see conftest)."""

from __future__ import annotations

import os
import stat

import pytest

from agent.store.ingest import Ingest
from agent.store.roles import Ingester
from common.errors import IntegrityError, Locked
from tests.store.conftest import b3, git_oid, sha256

DATA = os.urandom(3 * 1024 * 1024 + 12345)
MIN_PART = 1024 * 1024


def identity(data: bytes = DATA, **extra: object) -> dict[str, object]:
    return {"url": "http://127.0.0.1/model.bin", "size": len(data), "sha256": sha256(data),
            **extra}


def write_all(ingest: Ingest, data: bytes, step: int = 64 * 1024,
              upto: float = 1.0) -> None:
    """Write every segment (or the first ``upto`` of each) in ``step``-byte pieces, out of
    file order: the last segment first."""
    ingest.start_hasher()
    for seg in reversed(ingest.segments):
        assert seg.end is not None
        stop = seg.start + int((seg.end - seg.start) * upto)
        while seg.offset < stop:
            end = min(seg.offset + step, stop)
            pending = ingest.write(seg, memoryview(data[seg.offset:end]))
            if pending is not None:
                pending.wait()


def blob_bytes(ingester: Ingester, digest: str) -> bytes:
    return ingester.blobs.path(digest).read_bytes()


def test_a_download_in_parallel_segments_commits_a_read_only_verified_blob(
        ingester: Ingester) -> None:
    ingest = ingester.open_ingest("model-bin", identity())
    segments = ingest.plan(len(DATA), 3, MIN_PART)
    assert len(segments) == 3 and segments[0].start == 0 and segments[-1].end == len(DATA)
    write_all(ingest, DATA)
    sealed = ingest.commit(ingester.blobs, len(DATA), sha256(DATA))
    assert (sealed.size, sealed.blake3, sealed.sha256) == (len(DATA), b3(DATA), sha256(DATA))
    assert blob_bytes(ingester, b3(DATA)) == DATA
    assert stat.S_IMODE(ingester.blobs.path(b3(DATA)).stat().st_mode) == 0o444
    assert b3(DATA) in ingester.blobs.held(), "held for its pull until published"
    assert not ingest.dir.exists(), "nothing partial is left"


def test_a_closed_download_resumes_from_what_is_on_disk(ingester: Ingester) -> None:
    first = ingester.open_ingest("model-bin", identity())
    first.plan(len(DATA), 3, MIN_PART)
    write_all(first, DATA, upto=0.5)
    written = first.resumed_bytes  # (all segments: what is on disk so far)
    first.close()  # a restart: progress checkpointed, lock released
    again = ingester.open_ingest("model-bin", identity())
    assert again.resumed_bytes == written > 0
    segments = again.plan(len(DATA), 3, MIN_PART)
    assert sum(s.done for s in segments) == written
    write_all(again, DATA)
    assert again.commit(ingester.blobs, len(DATA), sha256(DATA)).blake3 == b3(DATA)
    assert blob_bytes(ingester, b3(DATA)) == DATA


def test_other_content_under_the_same_ref_starts_over(ingester: Ingester) -> None:
    first = ingester.open_ingest("model-bin", identity(etag='"v1"'))
    first.plan(len(DATA), 2, MIN_PART)
    write_all(first, DATA, upto=0.5)
    first.close()
    changed = DATA[::-1]
    again = ingester.open_ingest("model-bin", identity(changed, etag='"v2"'))
    assert again.resumed_bytes == 0
    again.plan(len(changed), 2, MIN_PART)
    write_all(again, changed)
    assert again.commit(ingester.blobs, len(changed), sha256(changed)).blake3 == b3(changed)


def test_one_writer_per_ref(ingester: Ingester) -> None:
    first = ingester.open_ingest("model-bin", identity())
    with pytest.raises(Locked, match=f"ingest model-bin locked since .* by pid {os.getpid()}"):
        ingester.open_ingest("model-bin", identity())
    other = ingester.open_ingest("other-ref", identity())  # another ref is free
    other.discard()
    first.close()
    ingester.open_ingest("model-bin", identity()).discard()


@pytest.mark.parametrize(("size", "digest", "message"), [
    (len(DATA) + 1, sha256(DATA), "size mismatch: expected"),
    (len(DATA), sha256(b"other"), "sha256 mismatch: the source stated"),
])
def test_bytes_that_do_not_match_are_never_committed(ingester: Ingester, size: int,
                                                     digest: str, message: str) -> None:
    ingest = ingester.open_ingest("model-bin", identity())
    ingest.plan(len(DATA), 2, MIN_PART)
    write_all(ingest, DATA)
    with pytest.raises(IntegrityError, match=message):
        ingest.commit(ingester.blobs, size, digest)
    ingest.discard()
    assert not ingester.blobs.exists(b3(DATA))
    assert ingester.find_stated(sha256(DATA), None) is None


def test_a_stated_git_blob_id_is_checked_in_the_same_pass(ingester: Ingester) -> None:
    small = b'{"model_type": "tiny"}'
    ident = {"url": "http://127.0.0.1/config.json", "size": len(small),
             "git_oid": git_oid(small)}
    ingest = ingester.open_ingest("config", ident)
    ingest.plan(len(small), 1, MIN_PART)
    write_all(ingest, small)
    sealed = ingest.commit(ingester.blobs, len(small), None, expected_git_oid=git_oid(small))
    assert (sealed.blake3, sealed.git_oid) == (b3(small), git_oid(small))
    wrong = ingester.open_ingest("config-2", {**ident, "url": "http://127.0.0.1/other"})
    wrong.plan(len(small), 1, MIN_PART)
    write_all(wrong, small)
    with pytest.raises(IntegrityError, match="git blob id mismatch"):
        wrong.commit(ingester.blobs, len(small), None, expected_git_oid=git_oid(b"other"))
    wrong.discard()


def test_content_already_stored_commits_as_success(ingester: Ingester) -> None:
    for ref in ("first", "second"):
        ingest = ingester.open_ingest(ref, identity())
        ingest.plan(len(DATA), 2, MIN_PART)
        write_all(ingest, DATA)
        assert ingest.commit(ingester.blobs, len(DATA), sha256(DATA)).blake3 == b3(DATA)
    assert [b.digest for b in ingester.blobs] == [b3(DATA)]


def test_a_sequential_writer_commits_verified_content(ingester: Ingester) -> None:
    data = b"an archive member " * 5000
    writer = ingester.blob_writer(sha256(data))
    for i in range(0, len(data), 4096):
        writer.write(data[i:i + 4096])
    sealed = writer.commit(ingester.blobs, len(data))
    assert (sealed.blake3, sealed.sha256, sealed.size) == (b3(data), sha256(data), len(data))
    assert blob_bytes(ingester, b3(data)) == data

    bad = ingester.blob_writer(sha256(b"something else"))
    bad.write(data)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        bad.commit(ingester.blobs, len(data))
    assert not bad.path.exists(), "the refused bytes are gone"
    short = ingester.blob_writer()
    short.write(b"short")
    with pytest.raises(IntegrityError, match="size mismatch"):
        short.commit(ingester.blobs, 6)
    assert not ingester.blobs.exists(b3(b"short"))


def test_content_is_found_by_the_digest_its_source_stated(ingester: Ingester) -> None:
    data, small = b"weights" * 1000, b"small file kept in git"
    for content, sha, oid in ((data, sha256(data), None), (small, None, git_oid(small))):
        writer = ingester.blob_writer()
        writer.write(content)
        sealed = writer.commit(ingester.blobs, len(content))
        ingester.note_blob(sealed.blake3, sealed.size, sha, oid)
    ingester.blobs.release([b3(data), b3(small)])
    assert ingester.find_stated(sha256(data), None) == (b3(data), len(data))
    assert ingester.find_stated(None, git_oid(small)) == (b3(small), len(small))
    # the strongest stated digest decides: a sha256 that is not stored is a miss
    assert ingester.find_stated(sha256(small), git_oid(small)) is None
    assert ingester.find_stated(None, None) is None
    assert ingester.blobs.held() == {b3(data), b3(small)}, "what was found is held"

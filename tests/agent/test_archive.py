"""Safe unpacking: real archives built here, good ones unpacked right, hostile ones refused
with nothing written outside the store."""

from __future__ import annotations

import gzip
import io
import os
import random
import stat
import struct
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.settings import ArchiveSettings, GiB, MiB
from agent.store import writer as writer_module
from agent.store.archive import unpack
from agent.store.local import Store
from agent.store.names import safe_relpath
from agent.store.trees import FileEntry
from common.errors import ArchiveRejected
from common.reference import archive_kind as kind_of

DEFAULTS = ArchiveSettings()
rng = random.Random(7)
WEIGHTS = rng.randbytes(300_000)
CONFIG = b'{"model_type": "llama"}'
TOKENS = rng.randbytes(5_000)
GOOD = {"config.json": CONFIG, "weights/model.safetensors": WEIGHTS, "tokenizer.bin": TOKENS}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    # deep inside tmp_path, so that a member escaping by '..' would land in tmp_path
    s = Store(tmp_path / "a" / "b" / "store")
    s.ensure_layout()
    return s


def snapshot(root: Path, store: Store) -> set[str]:
    """Every path under ``root`` except the store's own directories."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == store.root:
            dirnames[:] = []
            continue
        for name in (*dirnames, *filenames):
            seen.add(str(here / name))
    return seen


# --- building archives -------------------------------------------------------------------------


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names: we want them
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def by_path(entries: list[FileEntry]) -> dict[str, FileEntry]:
    return {e.path: e for e in entries}


def assert_unpacked(store: Store, entries: list[FileEntry], expected: dict[str, bytes]) -> None:
    got = by_path(entries)
    assert sorted(got) == sorted(expected)
    for path, data in expected.items():
        e = got[path]
        assert (e.size, e.blake3) == (len(data), blake3.blake3(data).hexdigest())
        assert store.blobs.path(e.blake3).read_bytes() == data
    assert list(store.tmp.iterdir()) == []


# --- good archives ---------------------------------------------------------------------------


def _good_tar() -> bytes:
    return tar_bytes([special("weights", tarfile.DIRTYPE), special("./", tarfile.DIRTYPE),
                      *GOOD.items()])


@pytest.mark.parametrize(("name", "kind", "build"), [
    ("m.tar", "tar", _good_tar),
    ("m.tar.gz", "tar.gz", lambda: gz(_good_tar())),
    ("m.tgz", "tar.gz", lambda: gz(_good_tar())),
    ("m.tar.zst", "tar.zst", lambda: zstandard.ZstdCompressor().compress(_good_tar())),
    ("m.zip", "zip", lambda: zip_bytes([("weights/", b""), *GOOD.items()])),
])
def test_good_archives_unpack_to_their_files(tmp_path: Path, store: Store, name: str,
                                             kind: str, build: object) -> None:
    assert kind_of(name.upper()) == kind
    path = write(tmp_path, name, build())  # type: ignore[operator]
    entries = unpack(path, kind, "", store, DEFAULTS)
    assert_unpacked(store, entries, GOOD)
    assert {b.digest for b in store.blobs} == {e.blake3 for e in entries}


def test_a_multi_frame_zstd_archive(tmp_path: Path, store: Store) -> None:
    raw = _good_tar()
    half = len(raw) // 2
    frames = b"".join(zstandard.ZstdCompressor().compress(p) for p in (raw[:half], raw[half:]))
    entries = unpack(write(tmp_path, "m.tar.zst", frames), "tar.zst", "", store, DEFAULTS)
    assert_unpacked(store, entries, GOOD)


def test_kind_of() -> None:
    assert kind_of("x.safetensors") is None
    assert kind_of("x.tar.gz.part") is None
    assert [kind_of(n) for n in ("a.tar", "a.TGZ", "a.tar.zst", "a.zip")] == [
        "tar", "tar.gz", "tar.zst", "zip"]


def test_root_selects_and_strips(tmp_path: Path, store: Store) -> None:
    raw = tar_bytes([
        special("models", tarfile.DIRTYPE),
        ("models/config.json", CONFIG),
        ("./models/sub/w.bin", WEIGHTS),
        ("models/.wh.deleted", b""),  # an OCI whiteout: not a file of the model
        ("other/.wh.config.json", b""),  # a whiteout outside the root: nothing at all
        ("other/config.json", b"not selected"),
        ("README", b"not selected"),
        ("modelsX/a", b"not selected"),
    ])
    entries = unpack(write(tmp_path, "layer.tar", raw), "tar", "/models/", store, DEFAULTS)
    # the whiteout is returned as such, for the puller to apply to the layers below
    assert [e.path for e in entries if e.whiteout] == [".wh.deleted"]
    assert_unpacked(store, [e for e in entries if not e.whiteout],
                    {"config.json": CONFIG, "sub/w.bin": WEIGHTS})
    assert len(list(store.blobs)) == 2  # skipped members are not stored


def test_nothing_under_root_yields_nothing(tmp_path: Path, store: Store) -> None:
    """An image layer that does not touch /models contributes no file (the puller refuses
    a model that ends up empty); links and devices outside the root are never written,
    so they are skipped, not refused (a modelcar's base layer has bin/sh and dev/null)."""
    raw = tar_bytes([("other/a", b"a"), special("bin/sh", tarfile.SYMTYPE, "/bin/busybox"),
                     special("dev/null", tarfile.CHRTYPE), special("h", tarfile.LNKTYPE, "a")])
    assert unpack(write(tmp_path, "l.tar", raw), "tar", "models", store, DEFAULTS) == []
    with pytest.raises(ArchiveRejected, match="is a link"):
        unpack(write(tmp_path, "l.tar", raw), "tar", "", store, DEFAULTS)
    with pytest.raises(ArchiveRejected, match="no regular files"):
        unpack(write(tmp_path, "e.tar", tar_bytes([])), "tar", "", store, DEFAULTS)


# --- hostile archives ------------------------------------------------------------------------


Members = list[tarfile.TarInfo | tuple[str, bytes]]


def hostile_tars(tmp_path: Path) -> dict[str, tuple[Members, str]]:
    outside = str(tmp_path / "outside")
    cases: list[tuple[str, Members, str]] = [
        ("dotdot", [("ok.bin", b"ok"), ("../../../evil", b"x")], "'../../../evil' contains '..'"),
        ("dotdot-inner", [("a/../../../../evil", b"x")], "contains '..'"),
        ("absolute", [(f"{tmp_path}/abs-evil", b"x")], "is an absolute path"),
        ("backslash", [("a\\..\\..\\evil", b"x")], "backslash"),
        ("control", [("evil\nname", b"x")], "control character"),
        ("symlink", [special("link", tarfile.SYMTYPE, outside)], "'link' is a link"),
        ("symlink-then-write", [special("dir", tarfile.SYMTYPE, outside),
                                ("dir/evil", b"through the link")], "'dir' is a link"),
        ("hardlink", [("a.bin", b"a"), special("h", tarfile.LNKTYPE, "a.bin")],
         "'h' is a link"),
        ("hardlink-outside", [special("h", tarfile.LNKTYPE, "/etc/passwd")], "'h' is a link"),
        ("chardev", [special("tty", tarfile.CHRTYPE)], "'tty' is a device or FIFO"),
        ("blockdev", [special("sda", tarfile.BLKTYPE)], "'sda' is a device or FIFO"),
        ("fifo", [special("pipe", tarfile.FIFOTYPE)], "'pipe' is a device or FIFO"),
        ("duplicate", [("a.bin", b"1"), ("a.bin", b"2")], "'a.bin' appears twice"),
        ("duplicate-dot", [("a.bin", b"1"), ("./a.bin", b"2")], "'a.bin' appears twice"),
        ("reserved", [("manifest.json", b"{}")], "reserved by the store"),
        ("unknown-type", [special("u", b"Z")], "'u' has an unsupported type"),
    ]
    return {label: (members, says) for label, members, says in cases}


@pytest.mark.parametrize("label", sorted(hostile_tars(Path("/nonexistent"))))
def test_hostile_tar_members_are_refused(tmp_path: Path, store: Store, label: str) -> None:
    (tmp_path / "outside").mkdir()
    members, says = hostile_tars(tmp_path)[label]
    for kind, data in (("tar", tar_bytes(members)),
                       ("tar.gz", gz(tar_bytes(members))),
                       ("tar.zst", zstandard.ZstdCompressor().compress(tar_bytes(members)))):
        path = write(tmp_path, f"{label}.{kind}", data)
        before = snapshot(tmp_path, store)
        with pytest.raises(ArchiveRejected) as info:
            unpack(path, kind, "", store, DEFAULTS)
        assert says in str(info.value), (label, kind)
        assert snapshot(tmp_path, store) == before, f"{label}: something was written"
        assert list((tmp_path / "outside").iterdir()) == []
        assert list(store.tmp.iterdir()) == []
        assert list(store.models.iterdir()) == []


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _zip_fifo(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info, b""


@pytest.mark.parametrize(("members", "says"), [
    ([("../evil", b"x")], "'../evil' contains '..'"),
    ([("/abs-evil", b"x")], "is an absolute path"),
    ([("a\\..\\evil", b"x")], "backslash"),
    ([_zip_symlink("link", "/etc")], "'link' is a symlink"),
    ([_zip_symlink("dir", "/tmp"), ("dir/evil", b"x")], "'dir' is a symlink"),
    ([_zip_fifo("pipe")], "'pipe' is not a regular file"),
    ([("a", b"1"), ("a", b"2")], "'a' appears twice"),
])
def test_hostile_zip_members_are_refused(tmp_path: Path, store: Store,
                                         members: list[tuple[str, bytes]], says: str) -> None:
    path = write(tmp_path, "m.zip", zip_bytes(members))  # type: ignore[arg-type]
    before = snapshot(tmp_path, store)
    with pytest.raises(ArchiveRejected) as info:
        unpack(path, "zip", "", store, DEFAULTS)
    assert says in str(info.value)
    assert snapshot(tmp_path, store) == before
    assert list(store.tmp.iterdir()) == []


def test_an_encrypted_zip_member_is_refused(tmp_path: Path, store: Store) -> None:
    raw = bytearray(zip_bytes([("secret.bin", b"x" * 100)]))
    # set the "encrypted" flag bit in the local and central headers
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(sig) + offset
        raw[at] |= 0x1
    with pytest.raises(ArchiveRejected, match=r"'secret\.bin' is encrypted"):
        unpack(write(tmp_path, "e.zip", bytes(raw)), "zip", "", store, DEFAULTS)


def test_too_many_members(tmp_path: Path, store: Store) -> None:
    raw = tar_bytes([(f"f{i}", b"%d" % i) for i in range(11)])
    with pytest.raises(ArchiveRejected, match=r"more than 10 members \(at 'f10'\)"):
        unpack(write(tmp_path, "m.tar", raw), "tar", "", store, ArchiveSettings(max_members=10))
    zipped = zip_bytes([(f"f{i}", b"") for i in range(11)])
    with pytest.raises(ArchiveRejected, match="more than 10 members"):
        unpack(write(tmp_path, "m.zip", zipped), "zip", "", store,
               ArchiveSettings(max_members=10))


def test_too_many_bytes(tmp_path: Path, store: Store) -> None:
    raw = tar_bytes([("a", b"a" * 600), ("b", b"b" * 600)])
    with pytest.raises(ArchiveRejected, match=r"more than 1000 bytes \(at 'b'\)"):
        unpack(write(tmp_path, "m.tar", raw), "tar", "", store, ArchiveSettings(max_bytes=1000))
    assert list(store.tmp.iterdir()) == []


# --- bombs: 1 GiB of zeros, built as a stream in a few milliseconds ------------------------------

BOMB = 1 * GiB


def _deflated_zeros(total: int, prefix: bytes) -> Iterator[bytes]:
    """Raw deflate of ``prefix`` + ``total`` zero bytes. After a full flush the compressor
    starts afresh, so every MiB of zeros compresses to the same bytes: compress one, repeat."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    for _ in range(total // MiB):
        yield block
    yield c.compress(bytes(total % MiB)) + c.flush(zlib.Z_FINISH)


def _crc_of(prefix: bytes, zeros: int) -> int:
    crc = zlib.crc32(prefix)
    block = bytes(MiB)
    for _ in range(zeros // MiB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(zeros % MiB), crc)


def gzip_tar_bomb(path: Path) -> None:
    info = tarfile.TarInfo("zeros.bin")
    info.size = BOMB
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    zeros = BOMB + 1024  # the member, then the two empty blocks that end a tar
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        for chunk in _deflated_zeros(zeros, header):
            f.write(chunk)
        f.write(struct.pack("<II", _crc_of(header, zeros), (len(header) + zeros) & 0xFFFFFFFF))


def zip_bomb(path: Path) -> None:
    name = b"zeros.bin"
    body = b"".join(_deflated_zeros(BOMB, b""))
    crc = _crc_of(b"", BOMB)
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(body), BOMB,
                        len(name), 0)
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(body),
                          BOMB, len(name), 0, 0, 0, 0, 0o644 << 16, 0)
    cd_offset = len(local) + len(name) + len(body)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name),
                      cd_offset, 0)
    path.write_bytes(local + name + body + central + name + end)


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Bytes each blob writer received (what a member got on disk before it was stopped)."""
    counts: dict[int, int] = {}
    real = writer_module.BlobWriter.write

    def counting(self: writer_module.BlobWriter, data: bytes | memoryview) -> None:
        counts[id(self)] = counts.get(id(self), 0) + len(data)
        real(self, data)

    monkeypatch.setattr(writer_module.BlobWriter, "write", counting)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind", "build"), [
    ("bomb.tar.gz", "tar.gz", gzip_tar_bomb),
    ("bomb.zip", "zip", zip_bomb),
])
def test_a_decompression_bomb_is_stopped_early(tmp_path: Path, store: Store,
                                               written: dict[int, int],
                                               name: str, kind: str, build: object) -> None:
    path = tmp_path / name
    started = time.monotonic()
    build(path)  # type: ignore[operator]
    compressed = path.stat().st_size
    assert compressed < 2 * MiB  # 1 GiB inflates from about 1 MiB
    with pytest.raises(ArchiveRejected, match="decompression bomb") as info:
        unpack(path, kind, "", store, DEFAULTS)
    assert "'zeros.bin'" in str(info.value)
    most = max(written.values())
    assert most <= DEFAULTS.max_ratio * compressed + 2 * MiB
    assert most < BOMB // 4  # stopped long before the end
    assert list(store.blobs) == [] and list(store.tmp.iterdir()) == []
    assert time.monotonic() - started < 20


def test_the_bomb_builders_make_valid_archives(tmp_path: Path) -> None:
    # the bombs are real archives: the standard library reads their headers and checksums
    gz = tmp_path / "b.tar.gz"
    gzip_tar_bomb(gz)
    with tarfile.open(gz, "r|gz") as tar:
        member = next(iter(tar))
        assert (member.name, member.size) == ("zeros.bin", BOMB)
    z = tmp_path / "b.zip"
    zip_bomb(z)
    with zipfile.ZipFile(z) as zf:
        (info,) = zf.infolist()
        assert (info.filename, info.file_size) == ("zeros.bin", BOMB)
        with zf.open(info) as f:
            assert f.read(MiB) == bytes(MiB)


# --- damaged archives ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.zst", "zip"])
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_a_truncated_archive_is_refused(tmp_path: Path, store: Store, kind: str,
                                        cut: float) -> None:
    raw = {"tar": _good_tar, "tar.gz": lambda: gz(_good_tar()),
           "tar.zst": lambda: zstandard.ZstdCompressor().compress(_good_tar()),
           "zip": lambda: zip_bytes(list(GOOD.items()))}[kind]()
    path = write(tmp_path, f"cut.{kind}", raw[: int(len(raw) * cut)])
    with pytest.raises(ArchiveRejected, match=r"corrupt or (truncated|unsupported)"):
        unpack(path, kind, "", store, DEFAULTS)
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.zst", "zip"])
@pytest.mark.parametrize("keep", [1, 3, 9, 12])
def test_an_archive_cut_inside_its_header_is_refused(tmp_path: Path, store: Store, kind: str,
                                                    keep: int) -> None:
    """Found by fuzzing: tarfile's own gzip reader failed with a TypeError on a gzip
    header cut after its third byte."""
    raw = {"tar": _good_tar, "tar.gz": lambda: gz(_good_tar()),
           "tar.zst": lambda: zstandard.ZstdCompressor().compress(_good_tar()),
           "zip": lambda: zip_bytes(list(GOOD.items()))}[kind]()
    path = write(tmp_path, f"cut.{kind}", raw[:keep])
    with pytest.raises(ArchiveRejected, match=r"corrupt or (truncated|unsupported)"):
        unpack(path, kind, "", store, DEFAULTS)
    assert list(store.tmp.iterdir()) == []


def test_a_corrupt_zip_member_is_refused(tmp_path: Path, store: Store) -> None:
    raw = bytearray(zip_bytes([("w.bin", WEIGHTS)]))
    at = raw.index(b"w.bin") + 5 + 1000  # inside the member's compressed bytes
    raw[at] ^= 0xFF
    with pytest.raises(ArchiveRejected, match=r"corrupt or truncated \(in member 'w\.bin'\)"):
        unpack(write(tmp_path, "bad.zip", bytes(raw)), "zip", "", store, DEFAULTS)
    assert list(store.blobs) == [] and list(store.tmp.iterdir()) == []


def test_an_unknown_kind_is_refused(tmp_path: Path, store: Store) -> None:
    with pytest.raises(ArchiveRejected, match="unknown archive kind 'rar'"):
        unpack(write(tmp_path, "m.rar", b"Rar!"), "rar", "", store, DEFAULTS)


# --- damage of any kind ------------------------------------------------------------------------

#: (what, where: a byte offset in the headers, or a fraction of the length, what with)
MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "delete", "insert"]),
                               st.integers(0, 600) | st.floats(0, 1),
                               st.binary(min_size=1, max_size=64)),
                     min_size=1, max_size=6)


def _damaged(raw: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(raw)
    for op, where, blob in mutations:
        if not data:
            break
        at = min(where if isinstance(where, int) else int(where * len(data)), len(data) - 1)
        if op == "flip":
            data[at] ^= blob[0] or 0xFF
        elif op == "cut":
            del data[at:]
        elif op == "delete":
            del data[at:at + len(blob)]
        else:
            data[at:at] = blob
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@example("tar.gz", "", [("cut", 3, b"\0")])  # the gzip header's flags byte cut off
@given(st.sampled_from(["tar", "tar.gz", "tar.zst", "zip"]), st.sampled_from(["", "models"]),
       MUTATIONS)
def test_any_damage_is_refused_or_unpacks_to_checked_blobs(
        kind: str, root: str, mutations: list[tuple[str, float, bytes]]) -> None:
    """Found by fuzzing like this: a gzip header cut after three bytes raised a TypeError.
    Whatever the damage, the archive is refused with ArchiveRejected, or what it unpacks to
    has safe names and blobs named by their content; nothing lands outside the store."""
    members = [(f"{root}/{name}" if root else name, data) for name, data in GOOD.items()]
    raw = {"tar": lambda: tar_bytes(members), "tar.gz": lambda: gz(tar_bytes(members)),
           "tar.zst": lambda: zstandard.ZstdCompressor().compress(tar_bytes(members)),
           "zip": lambda: zip_bytes(members)}[kind]()
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        store = Store(top / "a" / "b" / "store")
        store.ensure_layout()
        path = write(top, f"damaged.{kind}", _damaged(raw, mutations))
        before = snapshot(top, store)
        try:
            entries = unpack(path, kind, root, store, DEFAULTS)
        except ArchiveRejected as e:
            assert str(e)
            entries = []
        for e in entries:
            assert safe_relpath(e.path) == e.path
            if not e.whiteout:
                blob = store.blobs.path(e.blake3).read_bytes()
                assert blake3.blake3(blob).hexdigest() == e.blake3 and len(blob) == e.size
        assert snapshot(top, store) == before
        assert list(store.tmp.iterdir()) == []

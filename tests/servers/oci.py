"""OCI content built in memory: blobs, image and artifact manifests, indexes, tar layers,
OCI layouts on disk. Pushed to a registry by :mod:`tests.servers.registry`.

- :func:`artifact`: one layer per file, titled by ``org.opencontainers.image.title``
  (nested titles like ``tokenizer/vocab.json`` allowed), ModelPack-style media types;
- :func:`modelcar`: a KServe modelcar-style image: a busybox-like base layer and the model
  under ``models/`` in ``tar``, ``tar+gzip`` or ``tar+zstd`` layers, with a real config
  (``rootfs.diff_ids``);
- :func:`index`: an image index pointing at manifests (with platforms);
- :func:`raw_manifest`: exact bytes for hostile manifests (bad titles, bad digests, ...);
- :func:`tar_bytes` with :class:`TarEntry`: any tar, including hostile members
  (``..``, absolute, symlink-then-write, hard links outside, devices); :data:`HOSTILE_TARS`.

Manifest bytes are produced once and never re-serialized, so digests are exact.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zstandard

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_TAR_GZIP = MT_TAR + "+gzip"
MT_TAR_ZSTD = MT_TAR + "+zstd"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
# ModelPack (CNCF model-spec) style artifact types
MT_MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MT_MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MT_MODEL_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MT_MODEL_FILE = "application/vnd.cncf.model.weight.config.v1.raw"

Compression = Literal["tar", "gzip", "zstd"]
_LAYER_TYPES: dict[str, str] = {"tar": MT_TAR, "gzip": MT_TAR_GZIP, "zstd": MT_TAR_ZSTD}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Content addressed by its sha256, with the media type its descriptor carries."""

    data: bytes
    media_type: str
    annotations: Mapping[str, str] | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass(frozen=True)
class Image:
    """A manifest (or index) as exact bytes, with the blobs and manifests it references."""

    manifest: bytes
    media_type: str
    blobs: tuple[Blob, ...] = ()
    children: tuple[Image, ...] = ()
    files: Mapping[str, bytes] = field(default_factory=dict)
    """What a correct pull yields: model file path -> content (for assertions)."""

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def doc(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest))

    def descriptor(self, platform: Mapping[str, str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
        }
        if platform:
            d["platform"] = dict(platform)
        return d

    def all_blobs(self) -> list[Blob]:
        """Blobs of this image and of every manifest below it, each once."""
        seen: dict[str, Blob] = {}
        for child in self.children:
            for b in child.all_blobs():
                seen.setdefault(b.digest, b)
        for b in self.blobs:
            seen.setdefault(b.digest, b)
        return list(seen.values())


def _dump(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=False).encode()


def manifest(
    config: Blob,
    layers: Sequence[Blob],
    *,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Image:
    """An OCI image manifest over ``config`` and ``layers``."""
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = config.descriptor()
    doc["layers"] = [b.descriptor() for b in layers]
    if annotations:
        doc["annotations"] = dict(annotations)
    return Image(_dump(doc), MT_MANIFEST, (config, *layers), files=dict(files or {}))


def artifact(
    files: Mapping[str, bytes],
    *,
    artifact_type: str = MT_MODEL_ARTIFACT,
    config: Blob | None = None,
    media_types: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """A model artifact: each file one layer titled with its path (``a/b.json`` allowed).

    Weights (``.safetensors``, ``.bin``, ``.gguf``) get the ModelPack weight media type, other
    files the weight-config one, unless ``media_types`` says otherwise.
    """
    layers = []
    for path, data in files.items():
        mt = (media_types or {}).get(path) or (
            MT_MODEL_WEIGHT if path.endswith((".safetensors", ".bin", ".gguf")) else MT_MODEL_FILE
        )
        layers.append(Blob(data, mt, {TITLE: path}))
    if config is None:
        cfg = {"descriptor": {"name": "test-model"}, "config": {"format": "safetensors"}}
        config = Blob(_dump(cfg), MT_MODEL_CONFIG)
    return manifest(
        config, layers, artifact_type=artifact_type, annotations=annotations, files=files
    )


@dataclass(frozen=True)
class TarEntry:
    """One tar member, exactly as written (names are not sanitized)."""

    name: str
    data: bytes = b""
    kind: Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo"] = "file"
    link: str = ""
    mode: int = 0o644


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed POSIX (PAX) tar of ``entries``, deterministic (mtime fixed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TAR_TYPES[e.kind]
            info.mtime = 1_700_000_000
            info.mode = 0o755 if e.kind == "dir" and e.mode == 0o644 else e.mode
            info.linkname = e.link
            if e.kind in ("chardev", "blockdev"):
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


def tar_layer(entries: Iterable[TarEntry], compression: Compression = "tar") -> tuple[Blob, str]:
    """A layer blob and its diff id (sha256 of the uncompressed tar)."""
    raw = tar_bytes(entries)
    return Blob(compress(raw, compression), _LAYER_TYPES[compression]), sha256_digest(raw)


def model_entries(files: Mapping[str, bytes], root: str = "models") -> list[TarEntry]:
    """Tar members for ``files`` under ``root/``, parent directories first."""
    dirs: dict[str, None] = {f"{root}/": None}
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs[f"{root}/{'/'.join(parts[:i])}/"] = None
    out = [TarEntry(d, kind="dir") for d in dirs]
    out += [TarEntry(f"{root}/{p}", data) for p, data in files.items()]
    return out


BASE_ENTRIES = (
    TarEntry("bin/", kind="dir"),
    TarEntry("bin/busybox", b"\x7fELF not really busybox\n", mode=0o755),
    TarEntry("bin/sh", kind="symlink", link="/bin/busybox"),
    TarEntry("etc/", kind="dir"),
    TarEntry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    TarEntry("dev/", kind="dir"),
    TarEntry("dev/null", kind="chardev", mode=0o666),
)
"""A busybox-like base layer: what a modelcar's ``/models`` sits on. A puller must skip
all of it (absolute symlink and device node included) without failing."""


def modelcar(
    files: Mapping[str, bytes],
    *,
    layers: Sequence[Compression] = ("gzip",),
    base: bool = True,
    root: str = "models",
    extra_layers: Sequence[tuple[Sequence[TarEntry], Compression]] = (),
) -> Image:
    """A modelcar-style image: ``files`` under ``/<root>`` spread round-robin over one
    layer per entry of ``layers`` (compressions), on a base layer unless ``base=False``.
    ``extra_layers`` appends raw tar layers (hostile members for security tests)."""
    blobs: list[Blob] = []
    diff_ids: list[str] = []
    if base:
        blob, diff = tar_layer(BASE_ENTRIES, "gzip")
        blobs.append(blob)
        diff_ids.append(diff)
    items = list(files.items())
    for i, compression in enumerate(layers):
        part = dict(items[i :: len(layers)])
        blob, diff = tar_layer(model_entries(part, root), compression)
        blobs.append(blob)
        diff_ids.append(diff)
    for entries, compression in extra_layers:
        blob, diff = tar_layer(entries, compression)
        blobs.append(blob)
        diff_ids.append(diff)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "modelcache tests"} for _ in diff_ids],
    }
    return manifest(Blob(_dump(config), MT_CONFIG), blobs, files=files)


def index(*children: Image | tuple[Image, Mapping[str, str]]) -> Image:
    """An image index over ``children`` (each optionally with its platform)."""
    descs, kids = [], []
    for c in children:
        img, platform = c if isinstance(c, tuple) else (c, None)
        descs.append(img.descriptor(platform))
        kids.append(img)
    doc = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descs}
    files = kids[0].files if kids else {}
    return Image(_dump(doc), MT_INDEX, (), tuple(kids), files=files)


def raw_manifest(
    doc: Mapping[str, Any] | bytes,
    blobs: Sequence[Blob] = (),
    media_type: str = MT_MANIFEST,
) -> Image:
    """A manifest with exactly this content (hostile titles, digests, sizes, ...);
    a mapping is serialized compactly."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()
    return Image(data, media_type, tuple(blobs))


HOSTILE_TARS: dict[str, tuple[TarEntry, ...]] = {
    "dotdot": (TarEntry("models/../../escape.txt", b"escaped"),),
    "absolute": (TarEntry("/models/abs.txt", b"absolute"), TarEntry("/etc/evil", b"x")),
    "symlink_then_write": (
        TarEntry("models/", kind="dir"),
        TarEntry("models/link", kind="symlink", link="/tmp"),
        TarEntry("models/link/pwned.txt", b"written through a symlink"),
    ),
    "symlink_overwrite": (
        TarEntry("models/config.json", kind="symlink", link="../../../etc/passwd"),
        TarEntry("models/config.json", b"overwrite the link target"),
    ),
    "hardlink_outside": (TarEntry("models/passwd", kind="hardlink", link="/etc/passwd"),),
    "hardlink_dotdot": (TarEntry("models/h", kind="hardlink", link="../../etc/shadow"),),
    "chardev": (TarEntry("models/null", kind="chardev"),),
    "blockdev": (TarEntry("models/sda", kind="blockdev"),),
    "fifo": (TarEntry("models/fifo", kind="fifo"),),
}
"""Tar members a safe unpacker must refuse (each alone in a layer under ``models/``)."""


def write_layout(image: Image, directory: Path, tag: str) -> Path:
    """Write ``image`` as an OCI image layout (``skopeo copy oci:<dir>:<tag> ...``)."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(data: bytes) -> None:
        (blobs_dir / hashlib.sha256(data).hexdigest()).write_bytes(data)

    for b in image.all_blobs():
        put(b.data)
    for child in image.children:
        put(child.manifest)
    put(image.manifest)
    desc = image.descriptor()
    desc["annotations"] = {REF_NAME: tag}
    idx = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [desc]}
    (directory / "index.json").write_bytes(_dump(idx))
    return directory

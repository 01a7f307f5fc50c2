"""The signature check of a model's files, with OpenSSF model-signing (DESIGN.md, "Signatures").

Run after every file was verified against its source and committed as a blob, before the
tree is published. The signature is a Sigstore bundle (``model_signing sign`` writes it)
over an in-toto statement listing each file's digest (or each shard's). model-signing
checks the bundle (key, certificate chain, or Sigstore identity) and compares the signed
list with the model's own; the model's own list is given to it from what the store
already knows instead of a read of every file (:func:`_known`, through the library's
public ``set_hashing_config``):

- ``blake3`` over files: every blob's name. Free.
- ``sha256`` over files: the digest the source stated and the ingest checked in the same
  pass as blake3 (Hugging Face LFS, OCI layers). Free. Other files (small git files, plain
  HTTP, S3 without a checksum) are hashed from their blob now, once: the digest goes into
  the manifest, so a check under another policy or after a restart does not read them again.
- ``blake2b``, and any sharded serialization: hashed from the blobs now.

A model pulled with include globs is checked file by file: each file it serves must be
signed and match; signed files it does not select are not asked for.

Blocking (reads blobs, verifies signatures): async callers run it in a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.store.trees import FileEntry, Verification, clean_paths, tree_id
from agent.verify.policy import CERTIFICATE_CHAIN, PUBLIC_KEY, Policy
from common.errors import Unsigned, VerificationFailed

if TYPE_CHECKING:
    from model_signing import hashing

MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
READ_CHUNK = 4 * 1024 * 1024
HASHES = ("sha256", "blake2b", "blake3")


@dataclass(frozen=True)
class Signed:
    """What the signature says, read before it is verified: only used to know which digests
    to give the library; the library's own check of the bundle decides."""

    method: str
    hash_type: str
    shard_size: int
    ignore_paths: tuple[str, ...]
    resources: dict[str, tuple[str, str]]
    """name (``path`` or ``path:start:end``) -> (algorithm, hex digest)."""


def verify_files(policy: Policy, files: Sequence[FileEntry], blob_path: Callable[[str], Path],
                 work_dir: Path, selected: Callable[[str], bool] | None = None
                 ) -> tuple[Verification, tuple[FileEntry, ...]]:
    """Check the model's signature under ``policy``; return the passing check and the
    entries with any sha256 computed on the way filled in. Raise
    :class:`VerificationFailed` naming the policy and what failed. ``selected``: the pull's
    include globs (``None``: the whole model)."""
    where = f"verify policy {policy.scope!r}"
    by_path = {f.path: f for f in files if not f.whiteout}
    sig_entry = by_path.get(policy.signature)
    if sig_entry is None:
        raise Unsigned(f"{where}: the model has no signature file {policy.signature}")
    sig_file = blob_path(sig_entry.blake3)
    signed = read_signed(where, policy.signature, sig_file)
    served = {p: f for p, f in by_path.items()
              if p != policy.signature and not _ignored(p, signed.ignore_paths)}
    served, actual = _digests(where, signed, served, blob_path)
    if selected is not None:  # signed files the globs leave out: not served, not asked for
        for name, value in signed.resources.items():
            if not selected(name.split(":", 1)[0] if signed.method == "shards" else name):
                actual.setdefault(name, value)
    _library_check(where, policy, signed, actual, sig_file, work_dir)
    checked = tuple(served.get(f.path, f) for f in files)
    verification = Verification(policy.scope, signer(policy, sig_file), time.time(),
                                policy.method, policy.digest, tree_id(clean_paths(checked)))
    return verification, checked


# --- reading the signature -----------------------------------------------------------------


def read_signed(where: str, name: str, path: Path) -> Signed:
    try:
        if path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise VerificationFailed(f"{where}: signature file {name} is larger than "
                                     f"{MAX_SIGNATURE_BYTES} bytes")
        bundle = json.loads(path.read_bytes())
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"],
                                              validate=True))
        predicate = payload["predicate"]
        serialization_ = predicate["serialization"]
        method = serialization_["method"]
        resources = {r["name"]: (r["algorithm"], r["digest"]) for r in predicate["resources"]}
        signed = Signed(method, str(serialization_["hash_type"]),
                        int(serialization_.get("shard_size") or 0),
                        tuple(str(p) for p in serialization_.get("ignore_paths") or ()),
                        resources)
    except VerificationFailed:
        raise
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise VerificationFailed(f"{where}: signature file {name} is not a model-signing "
                                 f"bundle ({type(e).__name__}: {str(e)[:120]})") from None
    if signed.method not in ("files", "shards") or signed.hash_type not in HASHES \
            or (signed.method == "shards" and signed.shard_size <= 0):
        raise VerificationFailed(f"{where}: signature file {name} uses serialization "
                                 f"{signed.method}/{signed.hash_type}, which the agent does "
                                 "not check")
    return signed


def _ignored(path: str, ignore_paths: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in ignore_paths)


# --- the model's own digests ---------------------------------------------------------------


def _digests(where: str, signed: Signed, served: dict[str, FileEntry],
             blob_path: Callable[[str], Path]
             ) -> tuple[dict[str, FileEntry], dict[str, tuple[str, str]]]:
    """The model's items as the signature's serialization names them, each digest taken
    from what the store knows where it can be; the entries with new sha256s filled in."""
    actual: dict[str, tuple[str, str]] = {}
    out = dict(served)
    for path, f in served.items():
        if signed.method == "shards":
            algorithm = f"{signed.hash_type}-sharded-{signed.shard_size}"
            for start in range(0, f.size, signed.shard_size):
                end = min(f.size, start + signed.shard_size)
                actual[f"{path}:{start}:{end}"] = (
                    algorithm, _hash(signed.hash_type, blob_path(f.blake3), start, end))
        elif signed.hash_type == "blake3":
            actual[path] = ("blake3", f.blake3)
        elif signed.hash_type == "sha256":
            sha = f.sha256 or _hash("sha256", blob_path(f.blake3), 0, f.size)
            out[path] = replace(f, sha256=sha)
            actual[path] = ("sha256", sha)
        else:
            actual[path] = (signed.hash_type, _hash(signed.hash_type, blob_path(f.blake3),
                                                    0, f.size))
    return out, actual


def _hash(hash_type: str, path: Path, start: int, end: int) -> str:
    h: Any = hashlib.sha256() if hash_type == "sha256" else (
        hashlib.blake2b() if hash_type == "blake2b" else blake3.blake3())
    buf = bytearray(min(READ_CHUNK, max(end - start, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            n = fh.readinto(view[: min(left, len(buf))])
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL on large updates
            left -= n
    return str(h.hexdigest())


# --- the library's check -------------------------------------------------------------------


def _library_check(where: str, policy: Policy, signed: Signed,
                   actual: dict[str, tuple[str, str]], sig_file: Path, work_dir: Path) -> None:
    from model_signing import verifying  # imports sigstore: only where a policy is used

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="verify-", dir=work_dir) as tmp:
        material = Path(tmp) / "material"
        material.write_bytes(policy.material)
        config = verifying.Config()  # type: ignore[no-untyped-call]
        if policy.method == PUBLIC_KEY:
            config.use_elliptic_key_verifier(public_key=material)
        elif policy.method == CERTIFICATE_CHAIN:
            config.use_certificate_verifier(certificate_chain=[material])
        else:
            config.use_sigstore_verifier(identity=policy.identity, oidc_issuer=policy.issuer,
                                         trust_config=material)
        config.set_hashing_config(_known(signed, actual))
        try:
            config.verify(Path(tmp) / "model", sig_file)
        except Exception as e:  # the library raises ValueError, OpenSSL, sigstore errors alike
            if str(e).startswith("Signature mismatch"):
                # the bundle verified: what it lists is the signer's, and our diff says how
                # the files differ from it
                raise VerificationFailed(f"{where}: {_diff(signed.resources, actual)}") from None
            raise VerificationFailed(f"{where}: the signature does not verify: "
                                     f"{_reason(e)}") from None


def _known(signed: Signed, actual: dict[str, tuple[str, str]]) -> hashing.Config:
    """Stands in for model-signing's hashing config: the manifest it would compute by
    reading the files, built from the digests the store already has."""
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest

    params: dict[str, Any] = {"method": signed.method, "hash_type": signed.hash_type,
                              "allow_symlinks": False}
    if signed.method == "shards":
        params["shard_size"] = signed.shard_size
    kind = manifest.SerializationType.from_args(params)
    items = [kind.new_item(name, Digest(algorithm, bytes.fromhex(value)))
             for name, (algorithm, value) in actual.items()]
    known = manifest.Manifest("model", items, kind)

    class Known(hashing.Config):
        def hash(self, model_path: hashing.PathLike, *,
                 files_to_hash: Iterable[hashing.PathLike] | None = None) -> manifest.Manifest:
            return known

        def add_ignored_paths(self, *, model_path: hashing.PathLike,
                              paths: Iterable[hashing.PathLike]) -> None:
            return None  # applied already (see _ignored)

    return Known()  # type: ignore[no-untyped-call]


def _diff(signed: dict[str, tuple[str, str]], actual: dict[str, tuple[str, str]]) -> str:
    extra = sorted(set(actual) - set(signed))
    missing = sorted(set(signed) - set(actual))
    changed = sorted(n for n in set(signed) & set(actual) if signed[n] != actual[n])
    parts = []
    if changed:
        parts.append(f"content differs from the signed file: {_names(changed)}")
    if extra:
        parts.append(f"not covered by the signature: {_names(extra)}")
    if missing:
        parts.append(f"signed but missing from the model: {_names(missing)}")
    return "; ".join(parts) or "the signed file list differs"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:240]


# --- who signed ----------------------------------------------------------------------------


def signer(policy: Policy, sig_file: Path) -> str:
    """The signer as the check established it: the key's id (sha256 of its PEM, the hint
    model-signing writes), the signing certificate's subject, or the Sigstore identity."""
    if policy.method == PUBLIC_KEY:
        key = serialization.load_pem_public_key(policy.material)
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return "key sha256:" + hashlib.sha256(pem).hexdigest()
    if policy.method == CERTIFICATE_CHAIN:
        bundle = json.loads(sig_file.read_bytes())
        chain = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]
        leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0]["rawBytes"]))
        return leaf.subject.rfc4514_string()
    return f"{policy.identity} ({policy.issuer})"


__all__ = ["Signed", "read_signed", "signer", "verify_files"]

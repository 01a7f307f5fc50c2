"""Real signatures for test models: ``model_signing sign key`` and ``sign certificate`` (the
OpenSSF CLI, offline), with EC key pairs and a local CA chain (root -> intermediate ->
signing certificate with the code-signing usage) minted with ``cryptography``.

:class:`Signer` writes a model's files to a directory, signs it there as a model owner
would, and returns every file of the signed model (``model.sig`` included), ready to be
served by a test server.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pub_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @classmethod
    def make(cls, where: Path, name: str) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{name}.pem").write_bytes(_key_pem(key))
        (where / f"{name}.pub").write_bytes(_pub_pem(key))
        return cls(where / f"{name}.pem", where / f"{name}.pub")


@dataclass(frozen=True)
class CertChain:
    """A signing certificate under an intermediate under a root."""

    key: Path
    certificate: Path
    chain: Path
    """The intermediate, as the signer ships it in the bundle."""
    root: Path
    """What a verifier trusts (a policy's ``certificateChain``)."""
    subject: str

    @classmethod
    def make(cls, where: Path, name: str) -> CertChain:
        where.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _cert(f"{name} Root CA", root_key, None, root_key, ca=True, now=now)
        mid_key = ec.generate_private_key(ec.SECP256R1())
        mid = _cert(f"{name} Signing CA", mid_key, root, root_key, ca=True, now=now)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _cert(f"{name} model releases", leaf_key, mid, mid_key, ca=False, now=now)
        files = {"leaf.key": _key_pem(leaf_key),
                 "leaf.pem": leaf.public_bytes(serialization.Encoding.PEM),
                 "chain.pem": mid.public_bytes(serialization.Encoding.PEM),
                 "root.pem": root.public_bytes(serialization.Encoding.PEM)}
        for file, data in files.items():
            (where / f"{name}-{file}").write_bytes(data)
        return cls(where / f"{name}-leaf.key", where / f"{name}-leaf.pem",
                   where / f"{name}-chain.pem", where / f"{name}-root.pem",
                   leaf.subject.rfc4514_string())


def _cert(common_name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
          now: datetime.datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelcache tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def read_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Signer:
    """Signs models in directories under ``work`` with the ``model_signing`` CLI."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._n = 0

    def _dir(self, files: dict[str, bytes]) -> Path:
        self._n += 1
        model = self.work / f"model-{self._n}"
        write_tree(model, files)
        return model

    def with_key(self, files: dict[str, bytes], key: KeyPair,
                 signature: str = "model.sig") -> dict[str, bytes]:
        """``files`` plus the signature ``model_signing sign key`` writes for them."""
        model = self._dir(files)
        run([str(MODEL_SIGNING), "sign", "key", str(model), "--private_key", str(key.private),
             "--signature", str(model / signature)])
        return read_files(model)

    def with_certificate(self, files: dict[str, bytes], chain: CertChain) -> dict[str, bytes]:
        """``files`` plus the signature ``model_signing sign certificate`` writes."""
        model = self._dir(files)
        run([str(MODEL_SIGNING), "sign", "certificate", str(model),
             "--private_key", str(chain.key), "--signing_certificate", str(chain.certificate),
             "--certificate_chain", str(chain.chain), "--signature", str(model / "model.sig")])
        return read_files(model)


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv[:3]}: {done.stdout}{done.stderr}"


def flip_byte(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]

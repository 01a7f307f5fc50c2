"""``modelcache webhook certs``: a CA and a serving certificate for the webhook's Service.

For clusters without cert-manager. The CA signs one serving certificate whose names are
every way the API server may address the Service (``svc``, ``svc.ns``, ``svc.ns.svc``,
``svc.ns.svc.cluster.local``); its PEM, base64-encoded, is the webhook configuration's
``caBundle``, which this module can also patch into a MutatingWebhookConfiguration.
"""

from __future__ import annotations

import base64
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .cluster import KubeApi

WEBHOOK_CONFIGS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


@dataclass(frozen=True)
class Minted:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_bundle(self) -> str:
        """The webhook configuration's ``caBundle``: base64 of the CA's PEM."""
        return base64.b64encode(self.ca_pem).decode()


def dns_names(service: str, namespace: str) -> list[str]:
    base = f"{service}.{namespace}"
    return [service, base, f"{base}.svc", f"{base}.svc.cluster.local"]


def mint(
    service: str, namespace: str, days: int = 365,
    now: datetime.datetime | None = None,
) -> Minted:
    """A fresh CA (valid ten times as long) and a serving certificate signed by it."""
    now = now or datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)  # clock skew between nodes
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cn = f"modelcache-webhook-ca {namespace}"
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_cn)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=10 * days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = dns_names(service, namespace)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Minted(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def write(minted: Minted, out_dir: Path) -> dict[str, Path]:
    """Write ``ca.crt``, ``tls.crt`` and ``tls.key`` (0600), each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"ca.crt": minted.ca_pem, "tls.crt": minted.cert_pem, "tls.key": minted.key_pem}
    paths = {}
    for name, data in files.items():
        path = out_dir / name
        tmp = out_dir / f".{name}.tmp"
        mode = 0o600 if name.endswith(".key") else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        paths[name] = path
    return paths


async def patch_ca_bundle(api: KubeApi, name: str, ca_bundle: str) -> int:
    """Set ``clientConfig.caBundle`` of every webhook in the configuration; how many."""
    path = f"{WEBHOOK_CONFIGS}/{name}"
    config = await api.request("GET", path)
    webhooks = config.get("webhooks") or []
    version = (config.get("metadata") or {}).get("resourceVersion")
    operations: list[dict[str, object]] = []
    if version:  # fail rather than overwrite a concurrent change
        operations.append({"op": "test", "path": "/metadata/resourceVersion", "value": version})
    operations += [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle}
        for i in range(len(webhooks))
    ]
    if webhooks:
        await api.request("PATCH", path, body=operations,
                          content_type="application/json-patch+json")
    return len(webhooks)

"""``modelcache webhook certs``: a CA and a serving certificate for the webhook's Service.

For clusters without cert-manager. The CA signs one serving certificate whose names are
every way the API server may address the Service (``svc``, ``svc.ns``, ``svc.ns.svc``,
``svc.ns.svc.cluster.local``); its PEM, base64-encoded, is the webhook configuration's
``caBundle``, which this module can also patch into a MutatingWebhookConfiguration.

In a cluster the pair lives in a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``,
``ca.crt``) that the webhook mounts. :func:`ensure_secret` is idempotent: it keeps a pair
that is complete, names the Service, matches its key, was signed by the CA beside it and
is not within ``renew_before`` of expiry; otherwise it mints a new one. On renewal the CA
being replaced stays in ``ca.crt`` (and so in the caBundle) until it expires, because the
webhook's pods keep serving the old certificate until the kubelet refreshes their Secret
volume: the API server must trust both meanwhile.
"""

from __future__ import annotations

import base64
import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import Conflict, NotFound
from common.kube.client import KubeClient
from common.kube.errors import Invalid

TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 - a Secret type, not a secret
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
RENEW_BEFORE = datetime.timedelta(days=30)
#: how often a write that lost a race (409, or a failed resourceVersion test) is retried
ATTEMPTS = 5


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


async def patch_ca_bundle(kube: KubeClient, name: str, ca_bundle: str) -> int:
    """Set ``clientConfig.caBundle`` of every webhook in the configuration that lacks this
    one; how many were changed (0: all were current, nothing was written)."""
    for attempt in range(1, ATTEMPTS + 1):
        config = await kube.get_mutating_webhook_configuration(name)
        webhooks = config.get("webhooks") or []
        stale = [i for i, hook in enumerate(webhooks)
                 if (hook.get("clientConfig") or {}).get("caBundle") != ca_bundle]
        if not stale:
            return 0
        version = (config.get("metadata") or {}).get("resourceVersion")
        operations: list[dict[str, object]] = []
        if version:  # fail rather than overwrite a concurrent change
            operations.append({"op": "test", "path": "/metadata/resourceVersion",
                               "value": version})
        operations += [
            {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle}
            for i in stale
        ]
        try:
            await kube.patch_mutating_webhook_configuration(name, operations)
        except (Conflict, Invalid):
            if attempt < ATTEMPTS:
                continue  # changed since we read it (the test failed): read again
            raise
        return len(stale)
    raise AssertionError("unreachable")


# --- the Secret -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ensured:
    """What :func:`ensure_secret` did: ``created``, ``renewed`` or ``kept``, and why."""

    pair: Minted
    action: str
    why: str = ""


async def ensure_secret(
    kube: KubeClient, name: str, service: str, namespace: str, *, days: int = 365,
    renew_before: datetime.timedelta = RENEW_BEFORE, now: datetime.datetime | None = None,
) -> Ensured:
    """Make the ``kubernetes.io/tls`` Secret ``namespace/name`` hold a good pair for the
    Service: keep the one there, or mint and write a new one (create, or replace at the
    resourceVersion read, so a concurrent writer is never overwritten: on a conflict the
    Secret is read and judged again). A Secret of another type is a ``Conflict``."""
    now = now or datetime.datetime.now(datetime.UTC)
    for attempt in range(1, ATTEMPTS + 1):
        current = await _get(kube, namespace, name)
        if current is not None and current.get("type") != TLS_SECRET_TYPE:
            raise Conflict(
                f"Secret {namespace}/{name} has type {current.get('type')!r}, not "
                f"{TLS_SECRET_TYPE}, and a Secret's type cannot change: delete it and run again")
        pair, why = _judge(current, service, namespace, now, renew_before)
        if pair is not None:
            return Ensured(pair, "kept")
        old_ca = _decoded(current, "ca.crt") if current is not None else b""
        fresh = _keep_old_ca(mint(service, namespace, days, now), old_ca, now)
        try:
            if current is None:
                await kube.create_secret(namespace, _secret(name, namespace, fresh, None))
            else:
                await kube.replace_secret(namespace, name,
                                          _secret(name, namespace, fresh, current))
        except Conflict:
            if attempt < ATTEMPTS:
                continue  # another writer got there first: judge what it wrote
            raise
        return Ensured(fresh, "created" if current is None else "renewed", why)
    raise AssertionError("unreachable")


async def _get(kube: KubeClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await kube.get_secret(namespace, name)
    except NotFound:
        return None


def _decoded(secret: Mapping[str, Any], key: str) -> bytes:
    value = (secret.get("data") or {}).get(key)
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        return b""


def _judge(
    secret: Mapping[str, Any] | None, service: str, namespace: str, now: datetime.datetime,
    renew_before: datetime.timedelta,
) -> tuple[Minted | None, str]:
    """The Secret's pair if it can keep serving, else None and why not."""
    if secret is None:
        return None, "the Secret does not exist"
    found = {key: _decoded(secret, key) for key in SECRET_KEYS}
    missing = [key for key, value in found.items() if not value]
    if missing:
        return None, f"the Secret has no {', '.join(missing)}"
    pair = Minted(ca_pem=found["ca.crt"], cert_pem=found["tls.crt"], key_pem=found["tls.key"])
    why = problem(pair, service, namespace, now, renew_before)
    return (None, why) if why else (pair, "")


def problem(
    pair: Minted, service: str, namespace: str, now: datetime.datetime,
    renew_before: datetime.timedelta = RENEW_BEFORE,
) -> str:
    """Why this pair should not keep serving the Service ("" when it may)."""
    try:
        cert = x509.load_pem_x509_certificate(pair.cert_pem)
        ca = x509.load_pem_x509_certificates(pair.ca_pem)[0]
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
    except (ValueError, TypeError):
        return "the certificate, key or CA cannot be read"
    for what, c in (("serving certificate", cert), ("CA", ca)):
        if c.not_valid_after_utc - now < renew_before:
            return f"the {what} expires {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = set()
    unnamed = [n for n in dns_names(service, namespace) if n not in names]
    if unnamed:
        return f"the serving certificate does not name {', '.join(unnamed)}"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return "tls.key is not the key of tls.crt"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "the CA in ca.crt did not sign tls.crt"
    return ""


def _keep_old_ca(fresh: Minted, old_ca_pem: bytes, now: datetime.datetime) -> Minted:
    """``fresh`` with the CA it replaces appended to ``ca.crt`` while that CA is valid."""
    try:
        old = x509.load_pem_x509_certificates(old_ca_pem)[0]
    except ValueError:
        return fresh
    if old.not_valid_after_utc <= now:
        return fresh
    return Minted(ca_pem=fresh.ca_pem + old.public_bytes(serialization.Encoding.PEM),
                  cert_pem=fresh.cert_pem, key_pem=fresh.key_pem)


def _secret(
    name: str, namespace: str, pair: Minted, current: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Secret to write: ``current`` (its metadata and resourceVersion, any other keys)
    with the pair in it, or a new one."""
    metadata = dict((current or {}).get("metadata") or {"name": name, "namespace": namespace})
    labels = dict(metadata.get("labels") or {})
    labels.update({"app.kubernetes.io/name": "modelcache",
                   "app.kubernetes.io/component": "webhook-tls",
                   "app.kubernetes.io/managed-by": "modelcache-webhook-certs"})
    metadata["labels"] = labels
    data = dict((current or {}).get("data") or {})
    data.update({key: base64.b64encode(pem).decode() for key, pem in (
        ("tls.crt", pair.cert_pem), ("tls.key", pair.key_pem), ("ca.crt", pair.ca_pem))})
    return {"apiVersion": "v1", "kind": "Secret", "type": TLS_SECRET_TYPE,
            "metadata": metadata, "data": data}

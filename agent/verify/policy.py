"""Signature policies: what a model's signature is checked against (DESIGN.md, "Signatures").

A pull names a policy; its trust material comes from the config file's ``verifyPolicies``
standalone (the files are read at every pull, so a rotated key is used from the next one
on, and all of them once at start-up so a broken one is named before any pull), or, in a
cluster, from a ConfigMap of the caller's namespace named like the policy:

.. code-block:: yaml

    data:
      publicKey: |              # the signer's PEM public key (elliptic curve), or
        -----BEGIN PUBLIC KEY-----
        ...
      # certificateChain: |     # PEM CA certificates the signing certificate chains to, or
      # sigstore.identity: ci@example.com     # a Sigstore identity, its OIDC issuer, and
      # sigstore.issuer: https://accounts.example.com
      # sigstore.trustRoot: '{...}'           # the client trust config, given offline
      signature: model.sig      # optional: where the signature lies in the model

A policy is checked when it is loaded: exactly one method, a key or chain that loads, a
trust root that parses; every problem raises :class:`PolicyError` naming the policy.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.settings import PolicyFiles
from agent.store.names import safe_relpath
from common.errors import NotFound, PolicyError, UnsafeName
from common.reference import InvalidReference, check_policy_name

PUBLIC_KEY, CERTIFICATE_CHAIN, SIGSTORE = "publicKey", "certificateChain", "sigstore"
METHODS = (PUBLIC_KEY, CERTIFICATE_CHAIN, SIGSTORE)
DEFAULT_SIGNATURE = "model.sig"
#: the elliptic curves model-signing verifies (sign_ec_key._check_supported_ec_key)
CURVES = ("secp256r1", "secp384r1", "secp521r1")
MAX_MATERIAL_BYTES = 1024 * 1024
#: ConfigMap keys (``data``)
CM_KEYS = (PUBLIC_KEY, CERTIFICATE_CHAIN, "sigstore.identity", "sigstore.issuer",
           "sigstore.trustRoot", "signature")


@dataclass(frozen=True)
class Policy:
    """A loaded, checked signature policy."""

    scope: str
    """As the model's key names it: ``NAME``, or ``NAMESPACE/NAME`` in a cluster."""
    method: str
    """One of :data:`METHODS`."""
    material: bytes
    """The PEM public key, the PEM certificate chain, or the trust config JSON."""
    signature: str = DEFAULT_SIGNATURE
    """The signature file's path in the model."""
    identity: str = ""
    issuer: str = ""

    @property
    def digest(self) -> str:
        """sha256 over everything that decides the check (recorded with a passing one)."""
        h = hashlib.sha256()
        for part in (self.method, self.signature, self.identity, self.issuer):
            h.update(part.encode() + b"\0")
        h.update(self.material)
        return h.hexdigest()


def make_policy(scope: str, method: str, material: bytes, *, signature: str | None = None,
                identity: str = "", issuer: str = "") -> Policy:
    """Check a policy's parts; raise :class:`PolicyError` naming the policy and the part."""
    where = f"verify policy {scope!r}"
    try:
        sig = safe_relpath(signature or DEFAULT_SIGNATURE, what="signature path")
    except UnsafeName as e:
        raise PolicyError(f"{where}: {e}") from None
    if len(material) > MAX_MATERIAL_BYTES:
        raise PolicyError(f"{where}: {method} is larger than {MAX_MATERIAL_BYTES} bytes")
    if method == PUBLIC_KEY:
        _check_key(where, material)
    elif method == CERTIFICATE_CHAIN:
        _check_chain(where, material)
    elif method == SIGSTORE:
        identity, issuer = identity.strip(), issuer.strip()
        if not identity or not issuer:
            raise PolicyError(f"{where}: sigstore needs both an identity and an issuer")
        _check_trust_root(where, material)
    else:
        raise PolicyError(f"{where}: unknown method {method!r} (one of {', '.join(METHODS)})")
    return Policy(scope, method, material, sig, identity, issuer)


def _check_key(where: str, pem: bytes) -> None:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise PolicyError(f"{where}: publicKey is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise PolicyError(f"{where}: publicKey must be an elliptic curve key on "
                          f"{', '.join(CURVES)} (as model-signing signs)")


def _check_chain(where: str, pem: bytes) -> None:
    try:
        x509.load_pem_x509_certificates(pem)  # raises on none at all, too
    except ValueError:
        raise PolicyError(f"{where}: certificateChain is not a PEM bundle of "
                          "certificates") from None


def _check_trust_root(where: str, text: bytes) -> None:
    from sigstore.models import ClientTrustConfig  # heavy: only where a policy uses it

    try:
        ClientTrustConfig.from_json(text.decode())
    except Exception as e:  # sigstore raises pydantic, JSON and its own errors alike
        raise PolicyError(f"{where}: sigstore.trustRoot is not a Sigstore client trust "
                          f"config ({type(e).__name__})") from None


# --- where policies come from --------------------------------------------------------------


class PolicyProvider(Protocol):
    async def get(self, scope: str) -> Policy:
        """The policy a key's scope names, loaded and checked now."""
        ...


class ConfigPolicies:
    """Standalone: the config file's ``verifyPolicies``; their files read at every
    :meth:`get`."""

    def __init__(self, entries: Iterable[PolicyFiles]) -> None:
        self.entries = {e.name: e for e in entries}

    async def get(self, scope: str) -> Policy:
        entry = self.entries.get(scope)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise PolicyError(f"verify policy {scope!r} is not configured on this agent "
                              f"(verifyPolicies in its config file: {known})")
        return await asyncio.to_thread(load_files, entry)

    def check_all(self) -> None:
        """Load every policy once (start-up): a broken one is named before any pull."""
        for entry in self.entries.values():
            load_files(entry)


def load_files(entry: PolicyFiles) -> Policy:
    """A config file entry's policy, its files read now."""
    if entry.public_key is not None:
        method, path = PUBLIC_KEY, entry.public_key
    elif entry.certificate_chain is not None:
        method, path = CERTIFICATE_CHAIN, entry.certificate_chain
    elif entry.trust_root is not None:
        method, path = SIGSTORE, entry.trust_root
    else:
        raise PolicyError(f"verify policy {entry.name!r}: names no publicKey, "
                          "certificateChain or sigstore")
    try:
        material = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"verify policy {entry.name!r}: cannot read {method} file {path}: "
                          f"{e.strerror}") from None
    return make_policy(entry.name, method, material, signature=entry.signature,
                       identity=entry.sigstore_identity, issuer=entry.sigstore_issuer)


class ConfigMapReader(Protocol):
    async def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        ...


class ConfigMapPolicies:
    """In a cluster: the ConfigMap ``NAME`` in ``NAMESPACE`` of the scope, read when a pull
    needs it (never cached: an edited ConfigMap is used at the next pull)."""

    def __init__(self, reader: ConfigMapReader) -> None:
        self.reader = reader

    async def get(self, scope: str) -> Policy:
        namespace, _, name = scope.rpartition("/")
        if not namespace:
            raise PolicyError(f"verify policy {scope!r}: in a cluster a policy is a "
                              "ConfigMap, and this caller has no namespace")
        try:
            data = await self.reader.read_config_map(namespace, name)
        except NotFound:
            raise PolicyError(f"verify policy {scope!r}: no ConfigMap {name} in namespace "
                              f"{namespace}") from None
        return from_config_map(scope, data)


def from_config_map(scope: str, data: Mapping[str, str]) -> Policy:
    """A policy from a ConfigMap's ``data`` (see the module's text)."""
    where = f"verify policy {scope!r}"
    unknown = sorted(set(data) - set(CM_KEYS))
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(unknown)} in the ConfigMap "
                          f"(known: {', '.join(CM_KEYS)})")
    methods = [m for m in METHODS
               if m in data or (m == SIGSTORE and any(k.startswith("sigstore.") for k in data))]
    if len(methods) != 1:
        raise PolicyError(f"{where}: the ConfigMap must hold exactly one of publicKey, "
                          f"certificateChain or sigstore.* (found "
                          f"{', '.join(methods) or 'none'})")
    method = methods[0]
    if method == SIGSTORE:
        material = data.get("sigstore.trustRoot", "")
        if not material.strip():
            raise PolicyError(f"{where}: sigstore.trustRoot is required (policies are checked "
                              "offline; the public Sigstore root is not fetched)")
    else:
        material = data[method]
    return make_policy(scope, method, material.encode(), signature=data.get("signature"),
                       identity=data.get("sigstore.identity", ""),
                       issuer=data.get("sigstore.issuer", ""))


def policy_name(scope: str) -> str:
    """The policy's own name in a scope (``NAMESPACE/NAME`` -> ``NAME``)."""
    return scope.rpartition("/")[2]


def check_name(name: object) -> str:
    """A policy name from a caller, checked (raises :class:`PolicyError`)."""
    try:
        return check_policy_name(name)
    except InvalidReference as e:
        raise PolicyError(str(e)) from None


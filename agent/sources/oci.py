"""``oci://REGISTRY/REPO[:TAG|@sha256:DIGEST]``: a model in an OCI registry (distribution
API v2), as an artifact or as a modelcar image.

Resolving:

1. ``GET /v2/<repo>/manifests/<ref>`` accepting OCI and Docker v2 manifests and indexes; the
   bytes (at most :data:`MAX_MANIFEST`) are hashed: the sha256 must match the digest asked
   for and the registry's ``Docker-Content-Digest``. The top manifest's digest is the
   revision (a tag is resolved to it; a moved tag is a new revision).
2. An index picks ``linux/<this node's architecture>``, else ``linux/amd64``, else its only
   entry, and that manifest is fetched by digest (verified the same way).
3. Each layer (at most :data:`MAX_LAYERS`) must have a ``sha256:`` digest (malformed digests
   and other algorithms are refused) and becomes:

   - a file, if it carries ``org.opencontainers.image.title`` (ORAS and ModelPack
     artifacts): the title, checked like every name, is its path;
   - otherwise, if it is a tar layer (``tar``, ``tar+gzip``, ``tar+zstd``, Docker's gzip):
     a layer of a modelcar image, unpacked safely with only ``/models`` kept (KServe
     modelcars put the model there); later layers overlay earlier ones;
   - anything else is refused.

   Every blob is verified against its digest as it lands, and one the store already holds
   (by sha256) is not downloaded again.

Auth: anonymous; HTTP basic (credentials ``username`` + ``password``, or a
``.dockerconfigjson`` key holding Docker's ``auths``); bearer tokens (the registry's
``WWW-Authenticate: Bearer realm=...,service=...`` challenge, a ``pull`` scope for the
repository, basic credentials sent to the token service if given). The token realm is
followed only to the registry's own host or to a host the admin listed (``--allow-host``):
a registry cannot make the agent send credentials anywhere else. Tokens are renewed before
they expire and whenever a blob request is refused (``locate(refresh=True)``). Blob URLs are
``/v2/<repo>/blobs/<digest>``; registries often redirect them to object storage, which the
fetch engine follows, dropping the ``Authorization`` header when the host changes.

Registries on loopback and those listed in ``SourceSettings.oci_plain_http`` are reached over
plain HTTP; every other one over HTTPS. Docker Hub (``docker.io``) is reached as container
runtimes reach it: its API at ``registry-1.docker.io``, its token service at
``auth.docker.io`` (the one realm on another host followed without ``--allow-host``),
official images under ``library/``, and ``docker login``'s
``https://index.docker.io/v1/`` credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import platform
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from agent.sources.base import ArchiveKind, Credentials, Location, RemoteFile, Resolved
from agent.sources.control import Control, Reply
from agent.store.names import check_unique, safe_relpath
from common.errors import (
    IntegrityError,
    NotAllowed,
    SourceAuthError,
    SourceError,
)
from common.reference import Reference, split_host_port

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEXES = (MT_OCI_INDEX, MT_DOCKER_LIST)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
TITLE = "org.opencontainers.image.title"
MODELCAR_ROOT = "models"
TAR_LAYERS: dict[str, ArchiveKind] = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "tar.gz",
    "application/vnd.oci.image.layer.v1.tar+zstd": "tar.zst",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "tar.gz",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "tar.zst",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "tar.gz",
}
MAX_MANIFEST = 4 * 1024 * 1024
"""Bytes of a manifest or index (what distribution accepts on push)."""
MAX_LAYERS = 10_000
MAX_INDEX_ENTRIES = 1_000
TOKEN_SECONDS = 60
"""Lifetime of a token whose service does not say (the token specification's default)."""
TOKEN_MARGIN = 10.0
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_ALGORITHM = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:")
_CHALLENGE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')
#: Docker Hub as references name it; its API is at DOCKER_HUB_API, its token service at
#: DOCKER_HUB_REALM (another host, followed for Docker Hub alone), and a one-part repository
#: there is an official image under ``library/`` (as container runtimes resolve them)
DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_REALM = "auth.docker.io"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class OciBlob(RemoteFile):
    """A model file (or image layer) that is a blob of a repository in a registry."""

    registry: str = ""
    repository: str = ""


@dataclass
class _Grant:
    """How to authenticate to one repository with one set of credentials."""

    header: str | None
    expires: float = float("inf")
    """``time.monotonic()`` after which a bearer token is renewed."""
    challenge: dict[str, str] | None = None
    """The bearer challenge a token is asked for (to renew it)."""


class OciSource:
    schemes: tuple[str, ...] = ("oci",)

    def __init__(self, control: Control, plain_http: tuple[str, ...] = ()) -> None:
        self.control = control
        self.plain_http = frozenset(h.lower() for h in plain_http)
        self.arch = _ARCH.get(platform.machine().lower(), "amd64")
        self._grants: dict[tuple[str, str, str], _Grant] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    # --- the Source protocol -------------------------------------------------------------

    async def resolve(self, ref: Reference, credentials: Credentials | None) -> Resolved:
        registry, repo = ref.host, _repository(ref.host, ref.path)
        shown = ref.display
        digest, media_type, doc = await self._manifest(registry, repo, ref.revision,
                                                       credentials, shown)
        if media_type in INDEXES:
            child = self._pick(doc, shown)
            _, media_type, doc = await self._manifest(registry, repo, child, credentials,
                                                      shown)
            if media_type not in MANIFESTS:
                raise SourceError(f"{shown}: the index's {child} is a {media_type}, "
                                  "not an image manifest")
        files = self._files(registry, repo, doc, shown)
        return Resolved(ref, digest, tuple(files))

    async def locate(self, file: RemoteFile, credentials: Credentials | None, *,
                     refresh: bool = False) -> Location:
        if not isinstance(file, OciBlob):
            raise SourceError(f"{file.path} is not a blob of an OCI registry")
        grant = await self._grant(file.registry, file.repository, credentials, renew=refresh)
        return Location(file.url, {"Authorization": grant.header} if grant.header else {})

    async def check_access(self, ref: Reference, credentials: Credentials | None) -> None:
        repo = _repository(ref.host, ref.path)
        url = f"{self._base(ref.host)}/v2/{repo}/manifests/{ref.revision}"
        await self._send(ref.host, repo, credentials, "HEAD", url, ref.display)

    async def close(self) -> None:
        await self.control.close()

    # --- manifests -----------------------------------------------------------------------

    async def _manifest(self, registry: str, repo: str, reference: str,
                        credentials: Credentials | None, shown: str
                        ) -> tuple[str, str, dict[str, Any]]:
        """(digest, media type, document) of a manifest or index, verified."""
        url = f"{self._base(registry)}/v2/{repo}/manifests/{reference}"
        reply = await self._send(registry, repo, credentials, "GET", url, shown)
        digest = "sha256:" + hashlib.sha256(reply.body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{shown}: manifest {reference} has the digest {digest}")
        stated = reply.headers.get("Docker-Content-Digest", "").strip()
        if stated.startswith("sha256:") and stated != digest:
            raise IntegrityError(
                f"{shown}: the registry says the manifest is {stated}, its bytes are {digest}")
        try:
            doc = json.loads(reply.body)
        except ValueError as e:
            raise SourceError(f"{shown}: the manifest is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise SourceError(f"{shown}: the manifest is not a JSON object")
        media_type = doc.get("mediaType") or reply.headers.get("Content-Type", "")
        media_type = str(media_type).split(";", 1)[0].strip()
        if media_type not in (*MANIFESTS, *INDEXES):
            raise SourceError(f"{shown}: unsupported manifest type {media_type!r}")
        return digest, media_type, doc

    def _pick(self, index: dict[str, Any], shown: str) -> str:
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise SourceError(f"{shown}: the image index lists no manifests")
        if len(entries) > MAX_INDEX_ENTRIES:
            raise SourceError(f"{shown}: the image index lists more than "
                              f"{MAX_INDEX_ENTRIES} manifests")
        platforms: dict[tuple[str, str], str] = {}
        images: list[str] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise SourceError(f"{shown}: malformed image index entry")
            digest = _digest(entry, shown, "index entry")
            p = entry.get("platform")
            key = (str(p.get("os", "")), str(p.get("architecture", ""))) \
                if isinstance(p, dict) else ("", "")
            if key == ("unknown", "unknown"):
                continue  # build attestations, not images
            platforms.setdefault(key, digest)
            images.append(digest)
        for want in (("linux", self.arch), ("linux", "amd64")):
            if want in platforms:
                return platforms[want]
        if len(images) == 1:
            return images[0]
        listed = ", ".join(sorted("/".join(k) for k in platforms)) or "none"
        raise SourceError(f"{shown}: the image index has no linux/{self.arch} or "
                          f"linux/amd64 image (it has: {listed})")

    def _files(self, registry: str, repo: str, doc: dict[str, Any], shown: str
               ) -> list[OciBlob]:
        config = doc.get("config")
        if isinstance(config, dict):
            _digest(config, shown, "config")
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers:
            raise SourceError(f"{shown}: the manifest lists no layers")
        if len(layers) > MAX_LAYERS:
            raise SourceError(f"{shown}: the manifest lists {len(layers)} layers; more than "
                              f"{MAX_LAYERS} are refused")
        base = self._base(registry)
        files: list[OciBlob] = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise SourceError(f"{shown}: layer {i} is not a descriptor")
            digest = _digest(layer, shown, f"layer {i}")
            size = layer.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise SourceError(f"{shown}: layer {digest} has no valid size")
            annotations = layer.get("annotations")
            title = annotations.get(TITLE) if isinstance(annotations, dict) else None
            media_type = str(layer.get("mediaType", ""))
            common = {"url": f"{base}/v2/{repo}/blobs/{digest}", "size": size,
                      "sha256": digest.removeprefix("sha256:"), "registry": registry,
                      "repository": repo}
            if title is not None:
                path = safe_relpath(title, what=f"{shown} layer title")
                files.append(OciBlob(path=path, **common))  # type: ignore[arg-type]
            elif media_type in TAR_LAYERS:
                kind = TAR_LAYERS[media_type]
                name = f"layer-{i:05d}-{digest[7:19]}.{kind}"
                files.append(OciBlob(path=name, unpack=kind, unpack_root=MODELCAR_ROOT,
                                     **common))  # type: ignore[arg-type]
            else:
                raise SourceError(
                    f"{shown}: layer {digest} ({media_type or 'no media type'}) has no "
                    f"{TITLE} annotation and is not a tar layer")
        check_unique((f.path for f in files), what=f"{shown} layer title")
        return files

    # --- requests and auth ---------------------------------------------------------------

    def _base(self, registry: str) -> str:
        if registry.lower() in DOCKER_HUB:
            return f"https://{DOCKER_HUB_API}"
        name, _ = split_host_port(registry, 443)
        plain = registry in self.plain_http or name in self.plain_http or _loopback(name)
        return f"{'http' if plain else 'https'}://{registry}"

    async def _send(self, registry: str, repo: str, credentials: Credentials | None,
                    method: str, url: str, shown: str) -> Reply:
        """A registry API request, authenticated; one new grant after a 401."""
        grant = await self._grant(registry, repo, credentials)
        for attempt in (1, 2):
            headers = {"Accept": ACCEPT}
            if grant.header:
                headers["Authorization"] = grant.header
            reply = await self.control.request(method, url, headers=headers, ok=(200, 401),
                                               max_body=MAX_MANIFEST)
            if reply.status == 200:
                return reply
            challenge = reply.headers.get("WWW-Authenticate", "")
            if attempt == 2 or not challenge:
                break
            grant = await self._grant(registry, repo, credentials, challenge=challenge)
        who = "the credentials given" if _basic(credentials, registry) else "anonymous access"
        raise SourceAuthError(f"{shown}: the registry refused {who} (401)")

    async def _grant(self, registry: str, repo: str, credentials: Credentials | None, *,
                     challenge: str | None = None, renew: bool = False) -> _Grant:
        basic = _basic(credentials, registry)
        ident = hashlib.sha256(repr(basic).encode()).hexdigest()[:16]
        key = (registry, repo, ident)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            grant = self._grants.get(key)
            if challenge is not None:
                grant = await self._answer(registry, repo, basic, challenge)
            elif grant is None:
                grant = _Grant(None)
            elif grant.challenge is not None and (renew or time.monotonic() > grant.expires):
                grant = await self._token(registry, repo, basic, grant.challenge)
            self._grants[key] = grant
            return grant

    async def _answer(self, registry: str, repo: str, basic: tuple[str, str] | None,
                      challenge: str) -> _Grant:
        scheme, _, params = challenge.strip().partition(" ")
        scheme = scheme.lower()
        shown = f"oci://{registry}/{repo}"
        if scheme == "basic":
            if basic is None:
                raise SourceAuthError(f"{shown}: the registry requires credentials (basic "
                                      "auth) and none were given")
            return _Grant(_basic_header(*basic))
        if scheme == "bearer":
            values = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                      for m in _CHALLENGE.finditer(params)}
            if not values.get("realm"):
                raise SourceError(f"{shown}: the registry's bearer challenge has no realm")
            return await self._token(registry, repo, basic, values)
        raise SourceError(f"{shown}: unsupported authentication scheme {scheme!r}")

    async def _token(self, registry: str, repo: str, basic: tuple[str, str] | None,
                     challenge: dict[str, str]) -> _Grant:
        shown = f"oci://{registry}/{repo}"
        realm = challenge["realm"]
        self._check_realm(registry, realm, shown)
        query = {"scope": f"repository:{repo}:pull"}
        if challenge.get("service"):
            query["service"] = challenge["service"]
        sep = "&" if "?" in realm else "?"
        headers = {"Accept": "application/json"}
        if basic is not None:
            headers["Authorization"] = _basic_header(*basic)
        try:
            reply = await self.control.request("GET", f"{realm}{sep}{urlencode(query)}",
                                               headers=headers)
        except SourceAuthError as e:
            raise SourceAuthError(f"{shown}: the token service refused the credentials "
                                  f"({e})") from e
        body = reply.json()
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) \
            else None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{shown}: the token service answered no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = TOKEN_SECONDS
        expires = time.monotonic() + max(float(lifetime) - TOKEN_MARGIN, 1.0)
        return _Grant(f"Bearer {token}", expires, challenge)

    def _check_realm(self, registry: str, realm: str, shown: str) -> None:
        """The token realm must be the registry's own host or one the admin listed."""
        parts = urlsplit(realm)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if scheme not in ("http", "https") or not host:
            raise SourceError(f"{shown}: the token realm {realm!r} is not an http(s) URL")
        if self._base(registry).startswith("https:") and scheme != "https":
            raise NotAllowed(f"{shown}: the token realm {host} is plain http for an https "
                             "registry; refused")
        port = parts.port or (443 if scheme == "https" else 80)
        egress = self.control.egress
        own = split_host_port(registry, 443)[0].strip("[]").lower()
        if host == own or egress.host_listed(host, port):
            return
        if registry.lower() in DOCKER_HUB and (scheme, host, port) == (
                "https", DOCKER_HUB_REALM, 443):
            return
        raise NotAllowed(
            f"{shown}: the registry sends token requests to {host}:{port}, which is not the "
            f"registry's host; refused (allow it with --allow-host {host}:{port} if it is "
            "the registry's token service)")


def _digest(descriptor: dict[str, Any], shown: str, what: str) -> str:
    digest = descriptor.get("digest")
    if isinstance(digest, str) and _DIGEST.match(digest):
        return digest
    if isinstance(digest, str) and _ALGORITHM.match(digest) \
            and not digest.startswith("sha256:"):
        algorithm = digest.split(":", 1)[0]
        raise SourceError(f"{shown}: the {what} digest uses {algorithm}; only sha256 "
                          "digests are supported")
    raise SourceError(f"{shown}: the {what} has a malformed digest {str(digest)[:80]!r}")


def _loopback(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _basic(credentials: Credentials | None, registry: str) -> tuple[str, str] | None:
    """(username, password) for ``registry`` from a credentials mapping, if any."""
    if not credentials:
        return None
    creds = {k.lower(): v for k, v in credentials.items()}
    if creds.get("username") and "password" in creds:
        return creds["username"].strip(), creds["password"].strip()
    config = creds.get(".dockerconfigjson") or creds.get(".dockercfg")
    if not config:
        return None
    try:
        data = json.loads(config)
    except ValueError as e:
        raise SourceAuthError("the credentials' docker config is not JSON") from e
    auths = data.get("auths", data) if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for server, entry in auths.items():
        if _canonical(_server_key(server)) != _canonical(registry) or \
                not isinstance(entry, dict):
            continue
        if entry.get("username") and "password" in entry:
            return str(entry["username"]), str(entry["password"])
        if isinstance(entry.get("auth"), str):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise SourceAuthError(
                    f"the credentials' docker config entry for {registry} is malformed"
                ) from None
            if sep:
                return user, password
    return None


def _server_key(server: str) -> str:
    """``https://registry.example:5000/v1/`` -> ``registry.example:5000``."""
    server = server.strip().lower()
    if "://" in server:
        server = server.split("://", 1)[1]
    return server.split("/", 1)[0]


def _canonical(registry: str) -> str:
    """One name per registry: Docker Hub has several (``docker login`` files it under
    ``https://index.docker.io/v1/``)."""
    registry = registry.lower()
    return DOCKER_HUB_API if registry in DOCKER_HUB else registry


def _repository(registry: str, repo: str) -> str:
    """The repository as the registry's API names it: ``ubuntu`` on Docker Hub is
    ``library/ubuntu``."""
    if registry.lower() in DOCKER_HUB and "/" not in repo:
        return f"library/{repo}"
    return repo


def _basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

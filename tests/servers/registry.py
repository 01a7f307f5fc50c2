"""The Debian ``docker-registry`` (CNCF distribution 2.8) on loopback, and ways to push.

:func:`start_registry` runs the real registry with its own config (loopback, data in the
work dir), optionally with htpasswd basic auth (bcrypt), TLS (a ``trustme`` CA) or bearer
token auth: distribution verifies JWTs issued by :class:`TokenServer`, a small aiohttp
token service whose realm can sit on another host (127.0.0.2) for hostile-realm tests.

Pushing: :func:`skopeo_copy` copies an OCI layout written by
:func:`tests.servers.oci.write_layout` with ``--preserve-digests`` (manifest bytes
exact), as a user would; :class:`RegistryClient` pushes over plain HTTP (POST + PUT
``?digest=``, PUT manifest) and does the token dance, for hostile manifests skopeo would
refuse or rewrite.

What distribution 2.8 accepts and refuses on manifest PUT (checked in ``test_registry.py``):
layer annotations are not validated, so titles with ``..``, absolute paths, NUL and
duplicates are stored and served as pushed; a descriptor whose digest is malformed or of
an unknown algorithm is refused (500 ``UNKNOWN`` / 400 ``DIGEST_INVALID``), as is one whose
blob was never uploaded (400 ``MANIFEST_BLOB_UNKNOWN``), but ``sha512:`` blobs and
descriptors are accepted (``RegistryClient.push_blob(..., digest="sha512:...")``); a
manifest body over 4 MiB is refused (400 ``MANIFEST_INVALID``, "http: request body too
large"), which caps a manifest at about 20k titled layers. For what it refuses (a
100k-layer manifest, bad digests), :func:`serve_image` serves the exact bytes at the
registry API's paths from a :class:`~tests.servers.faulty.FaultyServer`, faults included.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.servers import oci
from tests.servers.aioserver import AppThread
from tests.servers.faulty import FaultyServer
from tests.servers.net import LOOPBACK, Reply, answers, fetch, free_port
from tests.servers.net import tls_client_context as _tls_ctx
from tests.servers.proc import ManagedProcess

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
ACCEPT = ", ".join(
    [
        oci.MT_MANIFEST,
        oci.MT_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class TokenRequest:
    """One request to the token service, as it arrived."""

    host: str
    query: Mapping[str, str]
    authorization: str | None
    status: int = 0


class TokenServer:
    """A Docker/OCI token service (``GET /token``) issuing RS256 JWTs distribution trusts.

    The signing certificate goes into the registry's ``rootcertbundle``; tokens carry it
    in ``x5c``. With ``users`` set, a token needs HTTP basic credentials; without, anyone
    gets one. Every grant is what was asked for (``scope=repository:<name>:pull,push``).
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        service: str = "modelcache-test-registry",
        issuer: str = "modelcache-test-issuer",
        ttl: int = 300,
    ) -> None:
        self.users = dict(users) if users is not None else None
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.base_url = ""
        self._lock = threading.Lock()
        self._log: list[TokenRequest] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcache test token signer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )

    @property
    def realm(self) -> str:
        return f"{self.base_url}/token"

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def log(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._log)

    def issue(self, scopes: list[str], subject: str = "anonymous") -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        encoded = (_b64url(json.dumps(part).encode()) for part in (header, claims))
        signing_input = ".".join(encoded)
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        entry = TokenRequest(request.host, dict(request.query), auth)
        with self._lock:
            self._log.append(entry)
        resp = self._answer(request, entry)
        entry.status = resp.status
        return resp

    def _answer(self, request: web.Request, entry: TokenRequest) -> web.Response:
        subject = "anonymous"
        if self.users is not None:
            user = _basic_user(entry.authorization, self.users)
            if user is None:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                    status=401,
                    headers={"WWW-Authenticate": 'Basic realm="token"'},
                )
            subject = user
        if request.query.get("service") != self.service:
            return web.json_response({"error": "unknown service"}, status=400)
        token = self.issue(request.query.getall("scope", []), subject)
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}
        )

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        return app


def _basic_user(header: str | None, users: Mapping[str, str]) -> str | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return None
    return user if users.get(user) == password else None


@contextmanager
def token_server(host: str = LOOPBACK, **kwargs: object) -> Iterator[TokenServer]:
    server = TokenServer(**kwargs)  # type: ignore[arg-type]
    with AppThread(server.make_app(), host=host, name="registry-token") as thread:
        server.base_url = thread.url
        yield server


@dataclass
class Registry:
    """A running ``docker-registry``; ``address`` is what goes in an ``oci://`` reference."""

    host: str
    port: int
    process: ManagedProcess
    workdir: Path
    ca: trustme.CA | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    token: TokenServer | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.ca is not None else "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def auth(self) -> str:
        return "token" if self.token else "basic" if self.users else "none"

    def ref(self, repo: str, tag_or_digest: str) -> str:
        """``oci://127.0.0.1:<port>/<repo>:<tag>`` (or ``@sha256:...``)."""
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"oci://{self.address}/{repo}{sep}{tag_or_digest}"

    def client(self, user: str | None = None, password: str | None = None) -> RegistryClient:
        if user is None and self.users:
            user, password = next(iter(self.users.items()))
        return RegistryClient(self, user, password)

    def stop(self) -> None:
        self.process.stop()


def _config(
    workdir: Path,
    host: str,
    port: int,
    *,
    htpasswd: Path | None,
    tls: tuple[Path, Path] | None,
    token: TokenServer | None,
    token_cert: Path | None,
) -> str:
    http: dict[str, object] = {"addr": f"{host}:{port}", "secret": uuid.uuid4().hex}
    if tls:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    conf: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "data")},
            "delete": {"enabled": True},
        },
        "http": http,
        "health": {"storagedriver": {"enabled": False}},
    }
    if htpasswd:
        conf["auth"] = {"htpasswd": {"realm": "modelcache-test", "path": str(htpasswd)}}
    if token and token_cert:
        conf["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token_cert),
            }
        }
    return json.dumps(conf, indent=2)  # YAML is a superset of JSON


def start_registry(
    workdir: Path,
    *,
    users: Mapping[str, str] | None = None,
    tls: trustme.CA | None = None,
    token: TokenServer | None = None,
    host: str = LOOPBACK,
    attempts: int = 3,
) -> Registry:
    """Start ``docker-registry serve``; ready when ``/v2/`` answers (200, or 401 with auth).

    ``users`` turns on htpasswd basic auth (bcrypt); ``token`` turns on bearer token auth
    against that (already running) :class:`TokenServer`; ``tls`` serves HTTPS.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = token_cert = None
    if users:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for u, p in users.items()
            )
        )
    if token:
        token_cert = workdir / "token-signer.pem"
        token_cert.write_bytes(token.cert_pem())
    tls_files = None
    probe_tls = None
    if tls:
        leaf = tls.issue_cert(host, "localhost")
        tls_files = (workdir / "cert.pem", workdir / "key.pem")
        leaf.cert_chain_pems[0].write_to_path(str(tls_files[0]))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(tls_files[0]), append=True)
        leaf.private_key_pem.write_to_path(str(tls_files[1]))
        probe_tls = _tls_ctx(tls.cert_pem.bytes())
    last: Exception | None = None
    for attempt in range(attempts):
        port = free_port(host)
        conf = workdir / "registry.yml"
        conf.write_text(
            _config(
                workdir, host, port, htpasswd=htpasswd, tls=tls_files, token=token,
                token_cert=token_cert,
            )
        )  # fmt: skip
        proc = ManagedProcess(
            [DOCKER_REGISTRY, "serve", conf], name=f"registry-{attempt}", log_dir=workdir
        ).start()
        try:
            proc.wait_ready(functools.partial(answers, host, port, "/v2/", probe_tls, (200, 401)),
                            timeout=15, what="docker-registry ready")
        except RuntimeError as e:
            last = e
            continue
        return Registry(host, port, proc, workdir, tls, dict(users or {}), token)
    raise RuntimeError(f"docker-registry failed {attempts} times") from last


@contextmanager
def registry_server(workdir: Path, **kwargs: object) -> Iterator[Registry]:
    reg = start_registry(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield reg
    finally:
        reg.stop()


class RegistryClient:
    """Plain HTTP pushes and reads, with basic auth or the bearer token dance."""

    def __init__(self, registry: Registry, user: str | None, password: str | None) -> None:
        self.registry = registry
        self.user = user
        self.password = password
        self._tls = _tls_ctx(registry.ca.cert_pem.bytes()) if registry.ca else None
        self._tokens: dict[str, str] = {}

    def _basic(self) -> str | None:
        if self.user is None:
            return None
        raw = f"{self.user}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, challenge: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        query = {"service": params.get("service", "")}
        if "scope" in params:
            query["scope"] = params["scope"]
        url = params["realm"] + "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": b} if (b := self._basic()) else {}
        reply = fetch(url, headers=headers)
        if reply.status != 200:
            raise RuntimeError(f"token service said {reply.status}: {reply.body[:200]!r}")
        return str(reply.json()["token"])

    def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        scope: str | None = None,
    ) -> Reply:
        """One registry request (``path`` under ``/v2/`` or absolute), authenticated."""
        url = path if path.startswith("http") else self.registry.base_url + path
        hdrs = dict(headers or {})
        key = scope or ""
        if self.registry.auth == "basic" and (b := self._basic()):
            hdrs["Authorization"] = b
        elif key in self._tokens:
            hdrs["Authorization"] = f"Bearer {self._tokens[key]}"
        reply = fetch(url, method=method, data=data, headers=hdrs, tls=self._tls)
        challenge = reply.headers.get("WWW-Authenticate", "")
        if reply.status == 401 and challenge.startswith("Bearer "):
            self._tokens[key] = self._token(challenge)
            hdrs["Authorization"] = f"Bearer {self._tokens[key]}"
            reply = fetch(url, method=method, data=data, headers=hdrs, tls=self._tls)
        return reply

    def push_blob(self, repo: str, blob: oci.Blob | bytes, digest: str | None = None) -> str:
        """Upload a blob (monolithic); ``digest`` may name another algorithm the registry
        supports (``sha512:<hex>``)."""
        data = blob.data if isinstance(blob, oci.Blob) else blob
        digest = digest or oci.sha256_digest(data)
        scope = f"repository:{repo}:pull,push"
        if self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope).status == 200:
            return digest
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", data=b"", scope=scope)
        if start.status != 202:
            raise RuntimeError(f"upload start: {start.status} {start.body[:300]!r}")
        location = urllib.parse.urljoin(self.registry.base_url, start.headers["Location"])
        sep = "&" if "?" in location else "?"
        done = self.request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(digest)}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            scope=scope,
        )
        if done.status != 201:
            raise RuntimeError(f"upload of {digest}: {done.status} {done.body[:300]!r}")
        return digest

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> Reply:
        """PUT exact manifest bytes; the reply says whether the registry accepted them."""
        return self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            data=body,
            headers={"Content-Type": media_type},
            scope=f"repository:{repo}:pull,push",
        )

    def push(self, image: oci.Image, repo: str, ref: str) -> str:
        """Push blobs, child manifests, then the manifest; returns its digest."""
        for blob in image.all_blobs():
            self.push_blob(repo, blob)
        for child in image.children:
            self.push(child, repo, child.digest)
        reply = self.put_manifest(repo, ref, image.manifest, image.media_type)
        if reply.status != 201:
            raise RuntimeError(f"manifest PUT {repo}:{ref}: {reply.status} {reply.body[:500]!r}")
        return image.digest

    def get_manifest(self, repo: str, ref: str) -> Reply:
        return self.request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            headers={"Accept": ACCEPT},
            scope=f"repository:{repo}:pull",
        )


def skopeo_copy(
    image: oci.Image,
    registry: Registry,
    repo: str,
    tag: str,
    workdir: Path,
    *,
    user: str | None = None,
    password: str | None = None,
) -> str:
    """Push ``image`` as a user would, with skopeo from an OCI layout (digests preserved).

    With token auth, skopeo does the bearer dance itself against the token service.
    """
    layout = oci.write_layout(image, workdir / f"layout-{uuid.uuid4().hex[:8]}", tag)
    argv = [SKOPEO, "copy", "--all", "--preserve-digests", "--quiet"]
    if registry.ca is not None:
        ca_dir = workdir / "skopeo-certs"
        ca_dir.mkdir(exist_ok=True)
        (ca_dir / "ca.crt").write_bytes(registry.ca.cert_pem.bytes())
        argv.append(f"--dest-cert-dir={ca_dir}")
    else:
        argv.append("--dest-tls-verify=false")
    if user is None and registry.users:
        user, password = next(iter(registry.users.items()))
    if user is not None:
        argv.append(f"--dest-creds={user}:{password or ''}")
    else:
        argv.append("--dest-no-creds")
    argv += [f"oci:{layout}:{tag}", f"docker://{registry.address}/{repo}:{tag}"]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False,
        env={"HOME": str(workdir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {out.stderr[-2000:]}")
    shutil.rmtree(layout)
    return image.digest


def serve_image(server: FaultyServer, repo: str, ref: str, image: oci.Image) -> str:
    """Serve ``image`` read-only from a fault server, at the registry API's paths.

    For manifests distribution refuses to store (100k layers, malformed digests): the
    exact bytes are served at ``/v2/<repo>/manifests/<ref>`` and ``.../<digest>``, blobs at
    ``/v2/<repo>/blobs/<digest>`` (with ranges and the fault server's faults). Returns
    ``oci://<address>/<repo>:<ref>``.
    """
    server.add("/v2/", b"{}", content_type="application/json")
    headers = {
        "Docker-Content-Digest": image.digest,
        "Docker-Distribution-API-Version": "registry/2.0",
    }
    for name in {ref, image.digest}:
        server.add(
            f"/v2/{repo}/manifests/{name}",
            image.manifest,
            content_type=image.media_type,
            etag=f'"{image.digest}"',
            extra_headers=headers,
        )
    for child in image.children:
        server.add(
            f"/v2/{repo}/manifests/{child.digest}",
            child.manifest,
            content_type=child.media_type,
            extra_headers={"Docker-Content-Digest": child.digest},
        )
    for blob in image.all_blobs():
        server.add(
            f"/v2/{repo}/blobs/{blob.digest}",
            blob.data,
            etag=f'"{blob.digest}"',
            extra_headers={"Docker-Content-Digest": blob.digest},
        )
    address = server.base_url.split("://", 1)[1]
    sep = "@" if ref.startswith("sha256:") else ":"
    return f"oci://{address}/{repo}{sep}{ref}"


def oras_push(
    registry: Registry,
    repo: str,
    tag: str,
    paths: list[Path],
    *,
    user: str | None = None,
    password: str | None = None,
) -> str:
    """Push files (and directories) with oras-py, as ``oras push`` users do.

    Each path becomes one layer titled with its *base name*; a file's media type is
    ``application/vnd.oci.image.layer.v1.tar`` even though it is not a tar, and a
    directory becomes a ``tar+gzip`` layer titled with the directory's name: the shapes a
    puller meets in the wild. Returns the pushed manifest's digest.
    """
    import oras.client  # imported here: only these pushes need it

    client = oras.client.OrasClient(
        hostname=registry.address,
        insecure=registry.ca is None,
        tls_verify=False if registry.ca is None else str(registry.workdir / "oras-ca.pem"),
    )
    if registry.ca is not None:
        registry.ca.cert_pem.write_to_path(str(registry.workdir / "oras-ca.pem"))
    if user is None and registry.users:
        user, password = next(iter(registry.users.items()))
    if user is not None:
        client.auth.set_basic_auth(user, password or "")
    target = f"{registry.address}/{repo}:{tag}"
    resp = client.push(
        target=target,
        files=[str(p) for p in paths],
        disable_path_validation=True,
        quiet=True,
    )
    if resp.status_code != 201:
        raise RuntimeError(f"oras push {target}: {resp.status_code} {resp.text[:300]}")
    return str(resp.headers["Docker-Content-Digest"])

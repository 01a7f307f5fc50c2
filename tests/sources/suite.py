"""The cases of the source conformance suite (``test_conformance.py``): one per source, each
a small model published on that source's real loopback server.

A case is built per test (its own model name on the shared servers) with the agent's own
``build_sources``, and says what the suite checks: the model's files, which digest the source
must state for each, credentials that grant and credentials that the server refuses, a
reference to nothing, and how to change the model at its source.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiohttp

from agent.egress import Egress
from agent.settings import AgentSettings, EgressSettings, SourceSettings
from agent.sources.base import Credentials, Location, RemoteFile, Resolved, Source
from agent.sources.catalog import build_sources
from common.errors import ModelcacheError, NotAllowed, SourceAuthError
from common.reference import parse
from tests.servers import oci
from tests.servers.hfhub import HubServer
from tests.servers.modelregistry import ModelRegistryServer
from tests.servers.nginx import NginxServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Endpoint, upload_model

Stated = Literal["sha256", "git", "none"]
LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.2")
NGINX_USER, NGINX_PASSWORD = "reader", "nginx-pw-1"
HF_TOKEN = "hf-token-1"
OCI_USER, OCI_PASSWORD = "alice", "oci-pw-1"
MR_TOKEN = "mr-token-1"
WRONG = "wrong-secret-9"
#: credential keys that name who, not the secret
NOT_SECRET = frozenset({"username", "AWS_ACCESS_KEY_ID"})


@dataclass
class Case:
    """One source's model, and what the suite expects of it."""

    sources: dict[str, Source]
    uri: str
    files: dict[str, bytes]
    stated: dict[str, Stated]
    """The digest the source must state up front for each file (``none``: only a change
    detector)."""
    credentials: Credentials | None
    denied_uri: str
    denied: Credentials | None
    denied_error: type[ModelcacheError]
    denied_says: str
    missing: str
    """A reference to nothing (with ``credentials`` that would grant it)."""
    missing_says: str
    change: Callable[[], dict[str, bytes]]
    """Change the model at its source; returns its files now."""

    @property
    def source(self) -> Source:
        return self.sources[parse(self.uri).scheme]

    def secrets(self) -> list[str]:
        """Every secret value the case's credentials hold (never in an error)."""
        return [v for creds in (self.credentials, self.denied)
                for k, v in (creds or {}).items() if k not in NOT_SECRET]


def make_sources(allow_paths: tuple[Path, ...] = (), **settings: Any) -> dict[str, Source]:
    agent = AgentSettings(
        node_name="conformance",
        egress=EgressSettings(allow_hosts=LOOPBACK_HOSTS, allow_paths=allow_paths),
        sources=SourceSettings(control_retries=1, **settings))
    return build_sources(Egress(agent.egress), agent)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def name() -> str:
    return uuid.uuid4().hex[:10]


def weights(n: int) -> bytes:
    """Bytes that differ at every offset (a ranged read from the wrong place shows)."""
    return b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(n // 32 + 1))[:n]


# --- the cases ------------------------------------------------------------------------------


def http_case(nginx: NginxServer) -> Case:
    path = f"{name()}/model.safetensors"
    target = nginx.root / path
    target.parent.mkdir()
    target.write_bytes(weights(300_000))

    def change() -> dict[str, bytes]:
        target.write_bytes(weights(300_001))
        return {"model.safetensors": target.read_bytes()}

    good = {"username": NGINX_USER, "password": NGINX_PASSWORD}
    return Case(
        sources=make_sources(), uri=nginx.url(path),
        files={"model.safetensors": target.read_bytes()}, stated={"model.safetensors": "none"},
        credentials=good, denied_uri=nginx.url(path),
        denied={"username": NGINX_USER, "password": WRONG},
        denied_error=SourceAuthError, denied_says="access denied (401)",
        missing=nginx.url(f"{path}.missing"), missing_says="model.safetensors.missing",
        change=change)


def file_case(tmp: Path) -> Case:
    seed = tmp / "seed"
    root = seed / name()
    files = {"config.json": b'{"model_type": "tiny"}', "weights/model.safetensors":
             weights(200_000), "tokenizer/vocab.json": b'{"a": 0, "b": 1}'}
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    outside = tmp / "not-allowed"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"a node file")

    def change() -> dict[str, bytes]:
        (root / "config.json").write_bytes(b'{"model_type": "tiny", "v": 2}')
        return {**files, "config.json": (root / "config.json").read_bytes()}

    return Case(
        sources=make_sources(allow_paths=(seed,)), uri=f"file://{root}", files=files,
        stated=dict.fromkeys(files, "none"), credentials=None,
        denied_uri=f"file://{outside}", denied=None, denied_error=NotAllowed,
        denied_says="not under a directory allowed by --allow-path",
        missing=f"file://{root}-missing", missing_says=f"{root.name}-missing",
        change=change)


def hf_case(hub: HubServer) -> Case:
    repo = f"org/{name()}"
    hub.create_repo(repo, private=True, gitattributes=False)
    files = {"config.json": b'{"architectures": ["Tiny"]}', "model.safetensors": weights(400_000)}
    hub.commit(repo, files)

    def change() -> dict[str, bytes]:
        now = {**files, "config.json": b'{"architectures": ["Tiny"], "v": 2}'}
        hub.commit(repo, now)
        return now

    return Case(
        sources=make_sources(hf_endpoint=hub.base_url), uri=f"hf://{repo}@main", files=files,
        stated={"config.json": "git", "model.safetensors": "sha256"},
        credentials={"token": HF_TOKEN}, denied_uri=f"hf://{repo}@main",
        denied={"token": WRONG}, denied_error=SourceAuthError, denied_says="access denied (401)",
        missing=f"hf://org/{name()}-missing@main", missing_says="-missing", change=change)


def s3_case(s3: S3Endpoint) -> Case:
    prefix = f"conformance/{name()}"
    files = {"config.json": b'{"model_type": "tiny"}', "model.safetensors": weights(600_000),
             "tokenizer/vocab.json": b'{"a": 0}'}
    client = s3.client()
    upload_model(client, s3.bucket, prefix, files, checksum_sha256=files)

    def change() -> dict[str, bytes]:
        now = {**files, "config.json": b'{"model_type": "tiny", "v": 2}'}
        upload_model(client, s3.bucket, prefix, {"config.json": now["config.json"]},
                     checksum_sha256=["config.json"])
        return now

    keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    return Case(
        sources=make_sources(s3_endpoint=s3.url, s3_region=s3.region),
        uri=f"s3://{s3.bucket}/{prefix}", files=files, stated=dict.fromkeys(files, "sha256"),
        credentials=keys, denied_uri=f"s3://{s3.bucket}/{prefix}",
        denied={**keys, "AWS_SECRET_ACCESS_KEY": WRONG}, denied_error=SourceAuthError,
        denied_says="access denied (SignatureDoesNotMatch)",
        missing=f"s3://{s3.bucket}/{prefix}-missing", missing_says=f"{prefix}-missing",
        change=change)


def oci_case(registry: Registry) -> Case:
    repo = f"conformance/{name()}"
    files = {"config.json": b'{"architectures": ["Tiny"]}', "model.safetensors": weights(500_000)}
    client = registry.client(OCI_USER, OCI_PASSWORD)
    client.push(oci.artifact(files), repo, "v1")

    def change() -> dict[str, bytes]:
        now = {**files, "config.json": b'{"architectures": ["Tiny"], "v": 2}'}
        client.push(oci.artifact(now), repo, "v1")
        return now

    return Case(
        sources=make_sources(), uri=registry.ref(repo, "v1"), files=files,
        stated=dict.fromkeys(files, "sha256"),
        credentials={"username": OCI_USER, "password": OCI_PASSWORD},
        denied_uri=registry.ref(repo, "v1"), denied={"username": OCI_USER, "password": WRONG},
        denied_error=SourceAuthError, denied_says="refused the credentials given",
        missing=registry.ref(repo, "v2-missing"), missing_says="v2-missing", change=change)


def model_registry_case(registry: ModelRegistryServer, hub: HubServer) -> Case:
    inner = hf_case(hub)
    model = f"m{name()}"
    registry.register(model, "v1", inner.uri)
    return Case(
        sources=make_sources(hf_endpoint=hub.base_url, model_registry=registry.host_port),
        uri=f"model-registry://{registry.host_port}/{model}/v1", files=inner.files,
        stated=inner.stated, credentials={"token": MR_TOKEN, "hf_token": HF_TOKEN},
        denied_uri=f"model-registry://{registry.host_port}/{model}/v1",
        denied={"token": WRONG, "hf_token": HF_TOKEN}, denied_error=SourceAuthError,
        denied_says="the model registry refused the token given",
        missing=f"model-registry://{registry.host_port}/{model}-missing/v1",
        missing_says=f"no registered model '{model}-missing'", change=inner.change)


# --- reading a file's bytes where the source says they are ----------------------------------


def locator(case: Case, resolved: Resolved) -> tuple[Source, Credentials | None]:
    """The source that locates the files, and its credentials, as the puller picks them: a
    reference that points elsewhere (model-registry) is fetched by its artifact's source."""
    if resolved.source_uri:
        return case.sources[parse(resolved.source_uri).scheme], resolved.credentials
    return case.source, case.credentials


async def read_from(session: aiohttp.ClientSession, location: Location, offset: int) -> bytes:
    """The file's bytes from ``offset`` on, as a resumed download asks for them."""
    if location.url.startswith("file://"):
        with open(unquote(urlsplit(location.url).path), "rb") as f:
            f.seek(offset)
            return f.read()
    headers = {**location.headers, "Range": f"bytes={offset}-"}
    async with session.get(location.url, headers=headers) as resp:
        assert resp.status == 206, (resp.status, await resp.text())
        assert resp.headers["Content-Range"].startswith(f"bytes {offset}-")
        return await resp.read()


async def read_tail(case: Case, resolved: Resolved, file: RemoteFile, offset: int, *,
                    refresh: bool = False) -> bytes:
    source, credentials = locator(case, resolved)
    location = await source.locate(file, credentials, refresh=refresh)
    async with aiohttp.ClientSession() as session:
        return await read_from(session, location, offset)

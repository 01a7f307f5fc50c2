"""Every source passes one suite, as containerd runs its ContentSuite against every content
store (and Spegel its ``storetest``): resolve, listing names, stated digests, errors (not
found, credentials refused) and resume, each against the source's real server on loopback:
nginx (http), a directory (file), the HF-compatible hub (hf), SeaweedFS (s3, real SigV4),
the docker-registry (oci) and the Model Registry stand-in (model-registry, its artifact on
the hub). The cases are in ``suite.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.store.names import safe_relpath
from common.errors import SourceNotFound
from common.reference import parse
from tests.servers.hfhub import HubServer, hub_server
from tests.servers.modelregistry import ModelRegistryServer, model_registry_server
from tests.servers.nginx import NginxServer, nginx_server
from tests.servers.registry import Registry, registry_server
from tests.servers.s3 import S3Endpoint
from tests.sources import suite
from tests.sources.suite import Case, git_oid, read_tail, sha256

# --- the servers, one per module (each test publishes its own model on them) --------------


@pytest.fixture(scope="module")
def auth_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    base = tmp_path_factory.mktemp("nginx-auth")
    (base / "www").mkdir()
    with nginx_server(base / "www", base / "run",
                      users={suite.NGINX_USER: suite.NGINX_PASSWORD}) as srv:
        yield srv


@pytest.fixture(scope="module")
def private_hub() -> Iterator[HubServer]:
    with hub_server(tokens={suite.HF_TOKEN}) as hub:
        yield hub


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with registry_server(tmp_path_factory.mktemp("registry-auth"),
                         users={suite.OCI_USER: suite.OCI_PASSWORD}) as reg:
        yield reg


@pytest.fixture(scope="module")
def model_registry_stand_in() -> Iterator[ModelRegistryServer]:
    with model_registry_server(token=suite.MR_TOKEN) as registry:
        yield registry


@pytest.fixture
def servers(auth_nginx: NginxServer, private_hub: HubServer, auth_registry: Registry,
            model_registry_stand_in: ModelRegistryServer, seaweedfs: S3Endpoint,
            no_aws_env: None) -> dict[str, object]:
    """Every source's server, started before the test (not by it: see _no_leaked_servers)."""
    return {"nginx": auth_nginx, "hub": private_hub, "registry": auth_registry,
            "model-registry": model_registry_stand_in, "s3": seaweedfs}


CASES: dict[str, Callable[[dict[str, Any], Path], Case]] = {
    "http": lambda s, tmp: suite.http_case(s["nginx"]),
    "file": lambda s, tmp: suite.file_case(tmp),
    "hf": lambda s, tmp: suite.hf_case(s["hub"]),
    "s3": lambda s, tmp: suite.s3_case(s["s3"]),
    "oci": lambda s, tmp: suite.oci_case(s["registry"]),
    "model-registry": lambda s, tmp: suite.model_registry_case(s["model-registry"], s["hub"]),
}


@pytest.fixture(params=list(CASES))
async def case(request: pytest.FixtureRequest, servers: dict[str, Any],
               tmp_path: Path) -> AsyncIterator[Case]:
    made = CASES[request.param](servers, tmp_path)
    try:
        yield made
    finally:
        for source in {id(s): s for s in made.sources.values()}.values():
            await source.close()


# --- the suite ------------------------------------------------------------------------------


async def test_resolve_gives_a_revision_and_every_file_with_its_size(case: Case) -> None:
    resolved = await case.source.resolve(parse(case.uri), case.credentials)
    assert resolved.revision and resolved.ref.uri == parse(case.uri).uri
    assert {f.path: f.size for f in resolved.files} == {p: len(d) for p, d in case.files.items()}
    again = await case.source.resolve(parse(case.uri), case.credentials)
    assert again.revision == resolved.revision, "nothing changed: the same revision"
    await case.source.check_access(parse(case.uri), case.credentials)


async def test_listed_names_are_safe_and_unique(case: Case) -> None:
    resolved = await case.source.resolve(parse(case.uri), case.credentials)
    paths = [f.path for f in resolved.files]
    assert all(safe_relpath(p) == p for p in paths)
    assert len(set(paths)) == len(paths)


async def test_stated_digests_are_the_contents_own(case: Case) -> None:
    resolved = await case.source.resolve(parse(case.uri), case.credentials)
    for f in resolved.files:
        data, kind = case.files[f.path], case.stated[f.path]
        assert f.sha256 == (sha256(data) if kind == "sha256" else None), f.path
        assert f.git_oid == (git_oid(data) if kind == "git" else None), f.path


async def test_a_ranged_read_from_an_offset_gives_the_same_bytes(case: Case) -> None:
    resolved = await case.source.resolve(parse(case.uri), case.credentials)
    for f in resolved.files:
        data = case.files[f.path]
        for offset in sorted({0, 1, len(data) // 3, len(data) - 1}):
            assert await read_tail(case, resolved, f, offset) == data[offset:], (f.path, offset)
        # a renewed location (after a 401/403 mid-pull) reads the same bytes
        renewed = await read_tail(case, resolved, f, len(data) // 2, refresh=True)
        assert renewed == data[len(data) // 2:]


async def test_a_missing_model_is_not_found_and_the_error_says_which(case: Case) -> None:
    with pytest.raises(SourceNotFound) as info:
        await case.source.resolve(parse(case.missing), case.credentials)
    assert case.missing_says in str(info.value)
    assert not any(secret in str(info.value) for secret in case.secrets())


async def test_refused_credentials_fail_clearly_and_never_show_the_secret(case: Case) -> None:
    ref = parse(case.denied_uri)
    for attempt in (case.source.resolve, case.source.check_access):
        with pytest.raises(case.denied_error) as info:
            await attempt(ref, case.denied)
        message = str(info.value)
        assert case.denied_says in message, message
        assert not any(secret in message for secret in case.secrets()), message


async def test_a_change_at_the_source_is_a_new_revision(case: Case) -> None:
    before = await case.source.resolve(parse(case.uri), case.credentials)
    now = case.change()
    after = await case.source.resolve(parse(case.uri), case.credentials)
    assert after.revision != before.revision
    assert {f.path: f.size for f in after.files} == {p: len(d) for p, d in now.items()}
    changed = next(f for f in after.files if now[f.path] != case.files[f.path])
    assert await read_tail(case, after, changed, 0) == now[changed.path]

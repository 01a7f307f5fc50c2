"""Shared fixtures: the real servers every source test needs (see ``tests/servers``), and
the rules every test keeps.

Each fixture starts what it yields and stops it at teardown (processes by PID, SIGTERM then
SIGKILL after 5 s; threads joined). Expensive servers are session-scoped and tests get
their own namespace in them (a directory, a bucket prefix, a repository name).

Rules: no test leaves a child process or a test-server thread behind
(``_no_leaked_servers``), and no async test leaves a task running (``no_leaked_tasks``, the
one rule for every async test and fixture, added to each at collection).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.servers.agent import InProcessAgent
from tests.servers.aioserver import SERVER_THREAD_NAMES
from tests.servers.faulty import FaultyServer, faulty_server
from tests.servers.hfhub import HubServer, hub_server
from tests.servers.modelregistry import ModelRegistryServer, model_registry_server
from tests.servers.nginx import NginxServer, ServedDir, start_nginx
from tests.servers.registry import Registry, registry_server, token_server
from tests.servers.s3 import S3Endpoint, moto_reset, moto_server, seaweedfs_server


def _live_children() -> set[int]:
    """PIDs of this process's children that are still running (zombies count: unreaped)."""
    me = str(os.getpid())
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out.add(int(stat.parent.name))
    return out


def _server_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name in SERVER_THREAD_NAMES}


@pytest.fixture(autouse=True)
def _no_leaked_servers() -> Iterator[None]:
    """Fail a test that leaves a child process or a test-server thread behind
    (session-scoped servers are started before this snapshot and do not count)."""
    procs, threads = _live_children(), _server_threads()
    yield
    leaked = _live_children() - procs
    assert not leaked, f"child processes left running: {sorted(leaked)}"
    extra = _server_threads() - threads
    assert not extra, f"test-server threads left running: {sorted(extra)}"


#: how long a task still running after the test's fixtures are torn down may take to end by
#: itself (a connection's lingering close, a cancelled task's cleanup) before it is a leak
LEAK_GRACE_SECONDS = 3.0


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves a task running: one the test or its fixtures started
    and that has not ended once every fixture is torn down (this one is set up first, so it
    is torn down last), after :data:`LEAK_GRACE_SECONDS` to end by itself. Leaked tasks are
    cancelled, so none spills into the next test, and named in the failure."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if left:
        await asyncio.wait(left, timeout=LEAK_GRACE_SECONDS)
    leaked = [t for t in left if not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        await asyncio.wait(leaked, timeout=LEAK_GRACE_SECONDS)
    assert not leaked, f"tasks leaked: {leaked}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test keeps the leaked-task rule, checked after all its fixtures."""
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and inspect.iscoroutinefunction(function) \
                and "no_leaked_tasks" not in item.fixturenames:  # type: ignore[attr-defined]
            item.fixturenames.insert(0, "no_leaked_tasks")  # type: ignore[attr-defined]


@pytest.fixture
async def in_process_agent() -> AsyncIterator[Callable[..., Any]]:
    """``await in_process_agent(settings, auth=..., token=..., kube=..., serve=True)``: a
    started :class:`~tests.servers.agent.InProcessAgent` (the one in-process harness), shut
    down at teardown, last started first."""
    started: list[InProcessAgent] = []

    async def start(settings: Any, **options: Any) -> InProcessAgent:
        agent = InProcessAgent(settings, **options)
        started.append(agent)
        return await agent.start()

    yield start
    for agent in reversed(started):
        await agent.close()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A test CA; ``tls_ca.cert_pem.bytes()`` is what clients must trust."""
    return trustme.CA()


# -- nginx ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    """One nginx for the session, serving ``nginx.root``; tests use ``nginx_dir``."""
    base = tmp_path_factory.mktemp("nginx")
    (base / "www").mkdir()
    srv = start_nginx(base / "www", base / "run")
    yield srv
    srv.stop()


@pytest.fixture
def nginx_dir(nginx: NginxServer) -> ServedDir:
    """A fresh directory of the session nginx: write files, fetch ``url(name)``."""
    name = uuid.uuid4().hex[:12]
    (nginx.root / name).mkdir()
    return ServedDir(nginx.root / name, nginx.url(name))


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[..., NginxServer]]:
    """``nginx_factory(root, tls=ca, redirects={path: location})``: extra nginx servers
    (TLS, redirect maps) that live for one test."""
    started: list[NginxServer] = []

    def make(root: Path, **kwargs: object) -> NginxServer:
        srv = start_nginx(root, tmp_path / f"nginx-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


# -- fault-injecting HTTP -------------------------------------------------------------
@pytest.fixture
def faulty() -> Iterator[FaultyServer]:
    """A :class:`FaultyServer` on 127.0.0.1: ``add(path, bytes)``, ``fault(path, Fault())``."""
    with faulty_server() as server:
        yield server


@pytest.fixture
def faulty_factory() -> Iterator[Callable[..., FaultyServer]]:
    """``faulty_factory(host="127.0.0.2")``: more fault servers (redirect targets)."""
    with ExitStack() as stack:
        yield lambda host="127.0.0.1": stack.enter_context(faulty_server(host))


# -- Hugging Face hub -----------------------------------------------------------------
@pytest.fixture
def hf_hub() -> Iterator[HubServer]:
    """A hub with small tree pages (3) and no CDN; set ``HF_ENDPOINT`` to ``base_url``."""
    with hub_server(page_size=3) as hub:
        yield hub


@pytest.fixture
def hf_hub_factory() -> Iterator[Callable[..., HubServer]]:
    """``hf_hub_factory(cdn=True, tokens={"t"}, page_size=2, require_auth=False)``."""
    with ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(hub_server(**kwargs))


# -- Kubeflow Model Registry ----------------------------------------------------------
@pytest.fixture
def model_registry() -> Iterator[ModelRegistryServer]:
    """An empty registry without auth; ``register(name, version, uri)`` seeds it."""
    with model_registry_server() as server:
        yield server


@pytest.fixture
def model_registry_factory() -> Iterator[Callable[..., ModelRegistryServer]]:
    """``model_registry_factory(token="t")``: registries that require a bearer token."""
    with ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(model_registry_server(**kwargs))


# -- OCI registry ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The real ``docker-registry`` for the session: anonymous, plain HTTP on 127.0.0.1.
    Push with ``oci_registry.client().push(image, repo, tag)`` or ``skopeo_copy``; use
    ``oci_repo`` for a repository name no other test uses."""
    with registry_server(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def oci_repo() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def oci_registry_factory(tmp_path: Path, tls_ca: trustme.CA) -> Iterator[Callable[..., Registry]]:
    """Registries with auth or TLS for one test::

    oci_registry_factory(users={"alice": "pw"})          # htpasswd basic auth
    oci_registry_factory(tls=True)                       # HTTPS, CA = tls_ca
    oci_registry_factory(token=True, token_users={...})  # bearer tokens (realm on 127.0.0.1)
    oci_registry_factory(token=True, realm_host="127.0.0.2")  # realm on another host
    """
    with ExitStack() as stack:

        def make(
            *,
            users: dict[str, str] | None = None,
            tls: bool = False,
            token: bool = False,
            realm_host: str = "127.0.0.1",
            token_users: dict[str, str] | None = None,
        ) -> Registry:
            ts = None
            if token:
                ts = stack.enter_context(token_server(host=realm_host, users=token_users))
            workdir = tmp_path / f"registry-{uuid.uuid4().hex[:8]}"
            return stack.enter_context(
                registry_server(workdir, users=users, tls=tls_ca if tls else None, token=ts)
            )

        yield make


# -- S3 -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_s3_server() -> Iterator[S3Endpoint]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def moto_s3(moto_s3_server: S3Endpoint) -> S3Endpoint:
    """moto's S3, emptied for this test, with an empty ``models`` bucket. Any credentials
    pass: use ``seaweedfs`` where signatures matter."""
    moto_reset(moto_s3_server)
    return moto_s3_server


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """SeaweedFS S3 (real SigV4; ``test`` / ``testsecret``; bucket ``models``), one per
    session: write under ``s3_prefix`` so tests do not see each other's objects."""
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"

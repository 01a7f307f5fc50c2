"""The modelcache agent for tests: a real process (:class:`AgentProcess`, ``python -m agent
agent --standalone``) or the one in-process harness (:class:`InProcessAgent`).

With ``kubeconfig`` the process runs in cluster mode instead (no ``--standalone``), against
the cluster that file names (the fake apiserver of ``tests/kubeapi``), as node ``node``.
With ``user`` it runs as that uid with no capability (``setpriv``), as the DaemonSet runs it.

The process is started on a free loopback port with its store under the test's directory;
ready when
``/readyz`` answers 200; stopped by SIGTERM (graceful) or killed with SIGKILL (crash tests)
and restarted on the same store. It inherits no source settings from the environment the
tests run in (``HF_*``, ``AWS_*``, ``MODEL_REGISTRY*``, proxies): only those it is given.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.servers.net import fetch, free_port
from tests.servers.proc import ManagedProcess, with_hosts

REPO = Path(__file__).resolve().parents[2]
#: environment variables a test's agent does not inherit (each sets a source's endpoint,
#: credentials or proxy)
NOT_INHERITED = ("HF_", "AWS_", "MODEL_REGISTRY")


class AgentProcess:
    """``config``: the config file's text; ``hosts``: names only this agent resolves, to
    their addresses (see :func:`tests.servers.proc.with_hosts`)."""

    def __init__(self, store: Path, *, allow_hosts: Sequence[str] = ("127.0.0.1",),
                 allow_paths: Sequence[Path] = (), extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, log_dir: Path | None = None,
                 name: str = "agent", config: str | None = None,
                 hosts: Mapping[str, str] | None = None, kubeconfig: Path | None = None,
                 node: str = "n1", user: int | None = None) -> None:
        self.store = store
        self.allow_hosts = list(allow_hosts)
        self.allow_paths = [Path(p) for p in allow_paths]
        self.extra_args = list(extra_args)
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(NOT_INHERITED) and "proxy" not in k.lower()}
        self.env = {**inherited, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true",
                    **({"NODE_NAME": node} if kubeconfig is not None else {}), **(env or {})}
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir or store.parent
        self.name = name
        self.hosts_file: Path | None = None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (self.log_dir / f"{name}-config.yaml").write_text(config)
            self.extra_args += ["--config", str(self.log_dir / f"{name}-config.yaml")]
        if hosts:
            self.hosts_file = self.log_dir / f"{name}-hosts"
            lines = ["127.0.0.1 localhost", *(f"{a} {n}" for n, a in hosts.items())]
            self.hosts_file.write_text("\n".join(lines) + "\n")
        #: run as this uid (and gid) with no capability at all, as the DaemonSet runs it
        self.user = user
        self.port = 0
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.store / "admin-token").read_text().strip()

    def start(self, timeout: float = 20.0) -> AgentProcess:
        self.port = free_port()
        mode = ["--standalone"] if self.kubeconfig is None else [
            "--kubeconfig", str(self.kubeconfig), "--startup-jitter", "0"]
        argv = [sys.executable, "-m", "agent", "agent", *mode,
                "--store", str(self.store), "--listen", f"127.0.0.1:{self.port}",
                "--log-level", "debug"]
        for host in self.allow_hosts:
            argv += ["--allow-host", host]
        for path in self.allow_paths:
            argv += ["--allow-path", str(path)]
        argv += self.extra_args
        if self.hosts_file is not None:
            argv = with_hosts(argv, self.hosts_file)
        if self.user is not None:
            argv = [*unprivileged(self.user), *argv]
        self.starts += 1
        self.proc = ManagedProcess(argv, name=f"{self.name}-{self.starts}", log_dir=self.log_dir,
                                   env=self.env, cwd=REPO).start()
        self.proc.wait_ready(lambda: fetch(self.url + "/readyz").status == 200, timeout=timeout,
                             what=f"agent on {self.url}")
        return self

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            print(self.log()[-4000:], file=sys.stderr)
        self.stop()

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to checkpoint or clean up."""
        assert self.proc is not None
        self.proc.kill()

    def log(self) -> str:
        return self.proc.log_tail(20000) if self.proc is not None else ""

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True
             ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        reply = fetch(self.url + path, method=method, headers=headers, data=data)
        try:
            return reply.status, json.loads(reply.body or b"null")
        except ValueError:
            return reply.status, reply.body.decode(errors="replace")

    def ensure(self, uri: str, **fields: Any) -> dict[str, Any]:
        status, body = self.call("POST", "/api/v1/models", {"uri": uri, **fields})
        assert status == 202, (status, body)
        return dict(body)

    def wait_ready(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        status, body = self.call("GET", f"/api/v1/models/{key}?wait={timeout}")
        assert status == 200, (status, body)
        return dict(body)


def unprivileged(uid: int) -> list[str]:
    """The prefix that runs a command as ``uid`` (and that gid), no supplementary groups and
    no capability: how the DaemonSet runs the agent (65532), or a pod's arbitrary uid."""
    return ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all"]


class _Own:
    """The agent's own token (the default of :meth:`InProcessAgent.call`)."""


OWN = _Own()


class InProcessAgent:
    """The one in-process agent of the tests: built by the composition root in the test's
    event loop (``agent.main.build``, or ``build_in_cluster`` when given a Kubernetes
    client) and, unless ``serve=False``, served as ``agent.main.serve`` serves it, its
    admin API on a loopback port (the cluster controller running beside it).

    ``async with InProcessAgent(settings) as agent:`` (or ``await agent.start()`` ...
    ``await agent.close()``) gives ``agent.deps`` (store, index, puller, evictor...),
    ``agent.controller`` (cluster mode), ``agent.url``, ``agent.call(...)`` and
    ``agent.client()``. ``auth`` replaces the token file (``TokenFileAuth(token)``: pass
    ``token`` too, for the calls); ``kube`` makes it a cluster node's agent, whose callers
    present their own tokens.
    """

    def __init__(self, settings: Any, *, auth: Any = None, token: str | None = None,
                 kube: Any = None, serve: bool = True) -> None:
        self.settings = settings
        self.auth = auth
        self.kube = kube
        self.serves = serve
        self._token = token
        self.deps: Any = None
        self.controller: Any = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> InProcessAgent:
        from agent.main import build, build_in_cluster, serve

        if self.kube is not None:
            self.deps, self.controller = await build_in_cluster(self.settings, self.kube)
        else:
            self.deps = await build(self.settings, auth=self.auth)
        if not self.serves:
            return self
        self._stop, started = asyncio.Event(), asyncio.Event()
        background = self.controller.run if self.controller is not None else None
        self._task = asyncio.create_task(serve(self.deps, self._stop, started,
                                               background=background), name="agent")
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            await self.close()
            raise RuntimeError("the agent did not start serving in 10 s")
        return self

    async def close(self) -> None:
        """Shut down as SIGTERM does (once): stop serving, stop the pulls, close clients."""
        if self._closed or self.deps is None:
            return
        self._closed = True
        if self._session is not None:
            await self._session.close()
        if self._task is not None:
            assert self._stop is not None
            self._stop.set()
            await self._task
            return
        await self.deps.puller.stop()  # never served: what serve() would close at its end
        await self.deps.puller.fetcher.close()
        for source in {id(s): s for s in self.deps.puller.sources.values()}.values():
            await source.close()

    async def __aenter__(self) -> InProcessAgent:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what the tests look at ------------------------------------------------------------

    @property
    def node(self) -> str:
        return str(self.settings.node_name)

    @property
    def index(self) -> Any:
        return self.deps.index

    @property
    def evictor(self) -> Any:
        return self.deps.evictor

    @property
    def store_root(self) -> Path:
        return Path(self.deps.store.root)

    @property
    def url(self) -> str:
        return f"http://{self.deps.state.address}"

    @property
    def token(self) -> str | None:
        """The admin token (standalone): the one given, else the token file's."""
        if self._token is None and self.kube is None and self.settings.api.token_file:
            self._token = Path(self.settings.api.token_file).read_text().strip()
        return self._token

    def client(self) -> Any:
        from agent.cli.client import AgentClient

        return AgentClient(self.url, self.token)

    # --- the admin API ---------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None, *,
                   token: str | _Own | None = OWN) -> tuple[int, Any]:
        """One request to the admin API: (status, JSON reply). The agent's own token goes
        with it unless ``token`` is given (``None``: no token at all)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        bearer = self.token if isinstance(token, _Own) else token
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        async with self._session.request(method, self.url + path, json=body,
                                         headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def pull(self, uri: str, *, pin: bool = False, wait: float = 30) -> dict[str, Any]:
        """Ensure a model through the API and wait until it is ready or failed."""
        status, model = await self.call("POST", "/api/v1/models",
                                        {"uri": uri, **({"pin": True} if pin else {})})
        assert status == 202, model
        return await self.wait(model["key"], wait)

    async def wait(self, key: str, wait: float = 30) -> dict[str, Any]:
        status, model = await self.call("GET", f"/api/v1/models/{key}?wait={wait}")
        assert status == 200, model
        return dict(model)

    async def keys(self) -> set[str]:
        status, body = await self.call("GET", "/api/v1/models")
        assert status == 200
        return {m["key"] for m in body["models"]}

    async def lease(self, key: str, owner: str, ttl: float = 3600) -> tuple[int, Any]:
        return await self.call("POST", f"/api/v1/models/{key}/leases",
                               {"owner": owner, "ttl_seconds": ttl})

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of the agent's /metrics (0 when absent)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (not labels and
                                                         line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def agent_settings(tmp: Path, **overrides: Any) -> Any:
    """Settings for a test agent: store and token under ``tmp``, loopback allowed."""
    from agent.settings import AgentSettings, ApiSettings, EgressSettings, StoreSettings

    egress = overrides.pop("egress", EgressSettings(allow_hosts=("127.0.0.1", "127.0.0.2")))
    return AgentSettings(
        node_name="test-node",
        store=overrides.pop("store", StoreSettings(path=tmp / "store")),
        egress=egress,
        api=ApiSettings(listen="127.0.0.1:0", token_file=tmp / "token"),
        **overrides,
    )

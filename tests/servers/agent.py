"""A real modelcache agent process (``python -m agent agent --standalone``) for tests.

With ``kubeconfig`` it runs in cluster mode instead (no ``--standalone``), against the
cluster that file names (the fake apiserver of ``tests/kubeapi``), as node ``node``.

Started on a free loopback port with its store under the test's directory; ready when
``/readyz`` answers 200; stopped by SIGTERM (graceful) or killed with SIGKILL (crash tests)
and restarted on the same store. It inherits no source settings from the environment the
tests run in (``HF_*``, ``AWS_*``, ``MODEL_REGISTRY*``, proxies): only those it is given.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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
                 node: str = "n1") -> None:
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
        assert self.proc is not None and self.proc.popen is not None
        self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait()

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


class InProcessAgent:
    """An agent built by ``agent.main.build`` and served on the running loop.

    ``async with InProcessAgent(settings) as agent:`` gives ``agent.deps`` (store, index,
    puller, metrics...), ``agent.url`` and ``agent.client()``.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.deps: Any = None
        self._stop: Any = None
        self._task: Any = None

    async def __aenter__(self) -> InProcessAgent:
        import asyncio

        from agent.main import build, serve

        self.deps = await build(self.settings)
        self._stop, started = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(serve(self.deps, self._stop, started))
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await self._task

    @property
    def url(self) -> str:
        return f"http://{self.deps.state.address}"

    @property
    def token(self) -> str:
        return Path(self.settings.api.token_file).read_text().strip()

    def client(self) -> Any:
        from agent.cli.client import AgentClient

        return AgentClient(self.url, self.token)


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

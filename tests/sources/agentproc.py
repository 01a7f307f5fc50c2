"""A real ``modelcache agent`` process for end-to-end source tests, driven through its
admin API; stopped by PID (SIGTERM, then SIGKILL) by whoever started it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.net import answers, free_port, wait_until
from tests.servers.proc import ManagedProcess, with_hosts

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    process: ManagedProcess
    url: str
    token: str
    store: Path


@contextmanager
def agent_process(workdir: Path, *, env: Mapping[str, str] | None = None,
                  credentials_dir: Path | None = None,
                  allow_hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2"),
                  config: str | None = None, log_level: str = "warning",
                  hosts: Mapping[str, str] | None = None,
                  ) -> Iterator[AgentProcess]:
    """``config``: the config file's text; ``hosts``: names the agent alone resolves, to
    addresses (see :func:`tests.servers.proc.with_hosts`)."""
    store = workdir / "store"
    port = free_port()
    argv = [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(store),
            "--listen", f"127.0.0.1:{port}", "--log-level", log_level]
    if config is not None:
        (workdir / "config.yaml").write_text(config)
        argv += ["--config", str(workdir / "config.yaml")]
    for host in allow_hosts:
        argv += ["--allow-host", host]
    if credentials_dir is not None:
        argv += ["--credentials-dir", str(credentials_dir)]
    skip = ("HF_", "AWS_", "MODEL_REGISTRY")
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(skip) and "proxy" not in k.lower()}
    child_env.update(PYTHONPATH=str(ROOT), AWS_EC2_METADATA_DISABLED="true", **(env or {}))
    if hosts:
        lines = [f"{address} {name}" for name, address in hosts.items()]
        (workdir / "hosts").write_text("\n".join(["127.0.0.1 localhost", *lines, ""]))
        argv = with_hosts(argv, workdir / "hosts")
    proc = ManagedProcess(argv, name="agent", log_dir=workdir, env=child_env, cwd=ROOT).start()
    try:
        wait_until(lambda: answers("127.0.0.1", port, "/readyz", None, (200,)), timeout=30,
                   what="agent ready", alive=proc.alive)
        token = (store / "admin-token").read_text().strip()
        yield AgentProcess(proc, f"http://127.0.0.1:{port}", token, store)
    except BaseException:
        print(proc.log_tail(), file=sys.stderr)
        raise
    finally:
        proc.stop()

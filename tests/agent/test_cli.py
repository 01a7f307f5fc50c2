"""The ``modelcache`` command line against a real agent process, and the demo."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.agent import REPO, AgentProcess
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.net import free_port

pytestmark = pytest.mark.slow  # each test runs real processes (the agent, the CLI): 2-5 s
MiB = 1024 * 1024
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(*args: str, agent: AgentProcess | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", *args]
    if agent is not None:
        argv += ["--agent", agent.url, "--token-file", str(agent.store / "admin-token")]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)


@pytest.fixture
def agent(tmp_path: Path) -> AgentProcess:
    proc = AgentProcess(tmp_path / "store", log_dir=tmp_path).start()
    yield proc  # type: ignore[misc]
    proc.stop()


def test_pull_ls_status_rm_gc(agent: AgentProcess, faulty: FaultyServer) -> None:
    data = os.urandom(2 * MiB)
    faulty.add("/w.safetensors", data)
    faulty.always("/w.safetensors", Fault(rate=4 * MiB, methods=("GET",)))
    uri = faulty.url("/w.safetensors")

    pulled = cli("pull", uri, "--wait", "--pin", agent=agent)
    assert pulled.returncode == 0, pulled.stderr
    key, state, *_ = pulled.stdout.split()
    assert state == "ready"
    assert "\r" not in pulled.stderr, "no progress bar when not on a terminal"

    listed = cli("ls", "--json", agent=agent)
    models = json.loads(listed.stdout)["models"]
    assert [(m["key"], m["state"], m["pinned"]) for m in models] == [(key, "ready", True)]
    table = cli("ls", agent=agent).stdout.splitlines()
    assert table[0].split() == ["KEY", "STATE", "SIZE", "PIN", "USE", "VERIFIED", "URI"]
    assert table[1].split()[:2] == [key, "ready"] and "2.0 MiB" in table[1]

    status = cli("status", agent=agent)
    assert "1 ready" in status.stdout and "evicts at 80% down to 70%" in status.stdout
    assert json.loads(cli("status", "--json", agent=agent).stdout)["store"]["blobs"] == 1

    removed = json.loads(cli("rm", key, "--json", agent=agent).stdout)
    assert removed["state"] == "evicted" and removed["freed_bytes"] == len(data)
    freed = cli("gc", "--json", agent=agent)
    assert json.loads(freed.stdout) == {"freed_bytes": 0}
    assert cli("gc", agent=agent).stdout.strip() == "freed 0 B"


def test_a_progress_bar_on_a_terminal(agent: AgentProcess, faulty: FaultyServer) -> None:
    faulty.add("/w.bin", os.urandom(3 * MiB))
    faulty.always("/w.bin", Fault(rate=2 * MiB, methods=("GET",)))
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "pull", faulty.url("/w.bin"), "--wait", "--agent",
         agent.url, "--token-file", str(agent.store / "admin-token")],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=child, text=True)
    os.close(child)
    out, _ = proc.communicate(timeout=60)
    assert "ready" in out
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "\r" in screen and "MiB/s" in screen and "ETA" in screen and "%" in screen


def test_errors_exit_non_zero_with_a_message(agent: AgentProcess, faulty: FaultyServer) -> None:
    failed = cli("pull", faulty.url("/missing.bin"), "--wait", agent=agent)
    assert failed.returncode == 1 and "not found (404)" in failed.stdout
    bad = cli("pull", "gopher://x/y", agent=agent)
    assert bad.returncode == 1 and "unknown scheme 'gopher'" in bad.stderr
    gone = cli("rm", "0123456789abcdef01234567", agent=agent)
    assert gone.returncode == 1 and "not in the store" in gone.stderr
    nobody = subprocess.run(
        [sys.executable, "-m", "agent", "ls", "--agent", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert nobody.returncode == 3 and "cannot reach the agent" in nobody.stderr
    no_token = subprocess.run(
        [sys.executable, "-m", "agent", "gc", "--agent", agent.url], cwd=REPO,
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in ENV.items() if k != "MODELCACHE_TOKEN"})
    assert no_token.returncode == 1 and "bearer token" in no_token.stderr


def test_the_demo_runs_on_loopback_and_cleans_up(tmp_path: Path) -> None:
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("modelcache-demo-*"))
    demo = cli("demo")
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert "Pulled hf://demo/tiny-llm@v1 -> ready" in out
    assert "Crossed the network: 72.0 MiB; shards downloaded: model-00001-of-00003" in out
    assert ("Crossed the network: 24.0 MiB; shards downloaded: "
            "model-00003-of-00003.safetensors.") in out
    assert "dedup saves 48.0 MiB" in out and "cache hit" in out
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("modelcache-demo-*")) == before

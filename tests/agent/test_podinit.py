"""``modelcache init`` run as a real process, as the injected init container runs, against a
real agent and store on loopback: warm node, cold node, agent down (fallback), and no
fallback allowed. The app containers start only after it exits 0, so after a success the
mount path must hold the complete model and after a failure nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from common.reference import parse
from tests.servers.agent import REPO, AgentProcess
from tests.servers.faulty import FaultyServer
from tests.servers.hfhub import HubServer
from tests.servers.net import free_port, wait_until
from tests.servers.nginx import NginxServer
from webhook.plan import Plan, plan
from webhook.settings import PlanSettings

MiB = 1024 * 1024
FILES = {
    "config.json": b'{"hidden_size": 8}',
    "weights/model.safetensors": None,  # random, filled per test
}


@pytest.fixture
def model_server(faulty: FaultyServer) -> tuple[FaultyServer, dict[str, bytes], str]:
    """A one-file model (an archive would do too) served over HTTP."""
    data = os.urandom(3 * MiB)
    faulty.add("/model.safetensors", data)
    return faulty, {"model.safetensors": data}, faulty.url("/model.safetensors")


def run_init(uri: str, mount: Path, side: Path, agent_url: str, token_file: Path,
             *extra: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    argv = [sys.executable, "-m", "agent", "init", "--uri", uri, "--mount-path", str(mount),
            "--side-path", str(side), "--agent-url", agent_url,
            "--token-file", str(token_file), "--connect-timeout", "2", *extra]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    return proc.returncode, proc.stderr, time.monotonic() - started


def mounted(mount: Path) -> dict[str, bytes]:
    """What the app container would read at the mount path (links followed)."""
    return {p.relative_to(mount).as_posix(): p.read_bytes()
            for p in sorted(mount.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_warm_node_links_the_tree_without_downloading(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    server, files, uri = model_server
    store = tmp_path / "store"
    agent = AgentProcess(store, log_dir=tmp_path).start()
    try:
        key = agent.ensure(uri)["key"]
        assert agent.wait_ready(key)["state"] == "ready"
        served = server.bytes_sent()
        mount = tmp_path / "mnt"
        code, err, seconds = run_init(uri, mount, store / "models" / key, agent.url,
                                      store / "admin-token", "--mode", "cache")
        assert code == 0, err
        assert mounted(mount) == files
        link = mount / "model.safetensors"
        assert link.is_symlink(), "warm: a link into the store, zero copy"
        assert Path(os.readlink(link)).is_relative_to(store / "models" / key)
        assert server.bytes_sent() == served, "a warm node downloads nothing"
        assert seconds < 2.0, f"warm init took {seconds:.2f} s"
        status, metrics = agent.call("GET", "/metrics")
        assert status == 200
        assert 'modelcache_cache_requests_total{result="hit"} 1.0' in metrics
        # the operator's pull filled the disk; the pod's init container had the model read
        # into the page cache for the container about to load it
        wait_until(lambda: 'modelcache_pagecache_warmings_total 1.0' in
                   agent.call("GET", "/metrics")[1], what="the warming the init asked for")
    finally:
        agent.stop()


@pytest.mark.slow
def test_cold_node_has_the_agent_pull_and_warms_the_node(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    server, files, uri = model_server
    store = tmp_path / "store"
    key = parse(uri).key
    side = store / "models" / key
    side.mkdir(parents=True)  # the agent made it, empty, as the pod was bound
    agent = AgentProcess(store, log_dir=tmp_path).start()
    try:
        mount = tmp_path / "mnt"
        code, err, _ = run_init(uri, mount, side, agent.url, store / "admin-token")
        assert code == 0, err
        assert mounted(mount) == files
        assert (mount / "model.safetensors").is_symlink()
        status, model = agent.call("GET", f"/api/v1/models/{key}")
        assert status == 200 and model["state"] == "ready", "the node is now warm"
        assert server.bytes_sent() == sum(len(d) for d in files.values())
    finally:
        agent.stop()


def test_agent_down_falls_back_to_the_source(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    server, files, uri = model_server
    side = tmp_path / "store" / "models" / parse(uri).key
    side.mkdir(parents=True)
    mount = tmp_path / "mnt"
    nobody = f"http://127.0.0.1:{free_port()}"
    code, err, _ = run_init(uri, mount, side, nobody, tmp_path / "no-token")
    assert code == 0, err
    assert mounted(mount) == files
    assert not (mount / "model.safetensors").is_symlink(), "fallback: real files"
    assert sorted(p.name for p in mount.iterdir()) == ["model.safetensors"], \
        "no work directory left behind"
    assert server.bytes_sent() == sum(len(d) for d in files.values())


def test_download_mode_never_needs_the_side_path(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    _, files, uri = model_server
    mount = tmp_path / "mnt"
    code, err, _ = run_init(uri, mount, tmp_path / "does-not-exist",
                            f"http://127.0.0.1:{free_port()}", tmp_path / "no-token",
                            "--mode", "download")
    assert code == 0, err
    assert mounted(mount) == files


def test_no_fallback_fails_clearly_and_leaves_the_mount_empty(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    server, _, uri = model_server
    side = tmp_path / "side"
    side.mkdir()
    mount = tmp_path / "mnt"
    code, err, _ = run_init(uri, mount, side, f"http://127.0.0.1:{free_port()}",
                            tmp_path / "no-token", "--fallback", "none")
    assert code == 1
    assert "cannot reach the agent" in err and "fallback is none" in err
    assert list(mount.iterdir()) == []
    assert server.bytes_sent() == 0


def test_a_failed_source_leaves_nothing_at_the_mount_path(tmp_path: Path,
                                                          faulty: FaultyServer) -> None:
    uri = faulty.url("/missing.safetensors")
    mount = tmp_path / "mnt"
    code, err, _ = run_init(uri, mount, tmp_path / "side", f"http://127.0.0.1:{free_port()}",
                            tmp_path / "no-token", "--mode", "download")
    assert code == 1
    assert "not found (404)" in err
    assert [p for p in mount.iterdir() if p.name != ".modelcache"] == []


@pytest.mark.slow
def test_an_agent_that_cannot_pull_leads_to_a_counted_fallback(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    """The pod can reach a source that the agent's egress policy refuses: the agent's pull
    fails, the init container downloads itself and reports the fallback."""
    _, files, uri = model_server
    store = tmp_path / "store"
    agent = AgentProcess(store, log_dir=tmp_path, allow_hosts=("10.9.9.9",)).start()
    try:
        side = store / "models" / parse(uri).key
        side.mkdir(parents=True)
        mount = tmp_path / "mnt"
        code, err, _ = run_init(uri, mount, side, agent.url, store / "admin-token")
        assert code == 0, err
        assert mounted(mount) == files
        status, model = agent.call("GET", f"/api/v1/models/{parse(uri).key}")
        assert status == 200 and model["state"] == "failed"
        assert "loopback address" in model["error"]
        status, metrics = agent.call("GET", "/metrics")
        assert 'modelcache_cache_requests_total{result="fallback"} 1.0' in metrics
    finally:
        agent.stop()


def planned_init_env(uri: str, settings: PlanSettings) -> dict[str, str]:
    """The environment the webhook gives the init container of a pod asking for ``uri``
    in download mode."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "labels": {"modelcache.io/inject": "true"},
                        "annotations": {"modelcache.io/model": uri,
                                        "modelcache.io/mode": "download"}},
           "spec": {"containers": [{"name": "app", "image": "x"}]}}
    result = plan(pod, {}, settings)
    assert isinstance(result, Plan), result
    (init,) = result.pod["spec"]["initContainers"]
    return {e["name"]: e["value"] for e in init["env"] if "value" in e}


@pytest.mark.slow
def test_download_mode_trusts_the_ca_the_webhook_passes(
        tmp_path: Path, nginx_factory: Callable[..., NginxServer]) -> None:
    """An in-cluster mirror signed by a private CA: the webhook's --init-ca-file reaches the
    init container, whose own download then trusts it; without it the download fails at
    once, saying the certificate is not trusted."""
    ca = trustme.CA()
    (tmp_path / "root").mkdir()
    data = os.urandom(2 * MiB + 5)
    (tmp_path / "root" / "m.bin").write_bytes(data)
    uri = nginx_factory(tmp_path / "root", tls=ca).url("m.bin")
    env = planned_init_env(uri, PlanSettings(allow_hosts=("127.0.0.1",),
                                             init_ca_pem=ca.cert_pem.bytes().decode()))
    assert set(env) == {"MODELCACHE_CA_PEM"}
    nobody = f"http://127.0.0.1:{free_port()}"

    code, err, _ = run_init(uri, tmp_path / "a", tmp_path / "none", nobody,
                            tmp_path / "no-token", "--mode", "download")
    assert code != 0 and "TLS certificate is not trusted" in err
    code, err, _ = run_init(uri, tmp_path / "b", tmp_path / "none", nobody,
                            tmp_path / "no-token", "--mode", "download", env=env)
    assert code == 0, err
    assert mounted(tmp_path / "b") == {"m.bin": data}
    broken = {"MODELCACHE_CA_PEM": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}
    code, err, _ = run_init(uri, tmp_path / "c", tmp_path / "none", nobody,
                            tmp_path / "no-token", "--mode", "download", env=broken)
    assert code != 0 and "the CA bundle the webhook passed (--init-ca-file) is not valid" in err


def test_download_mode_uses_the_mirror_the_webhook_passes(
        tmp_path: Path, hf_hub: HubServer) -> None:
    """An air-gapped hub mirror: the webhook's --init-env HF_ENDPOINT reaches the init
    container, whose own download asks the mirror, not the public hub."""
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", {"config.json": b"{}", "w.safetensors": os.urandom(MiB)})
    env = planned_init_env("hf://org/m@main", PlanSettings(
        init_env=(("HF_ENDPOINT", hf_hub.base_url),)))
    assert env == {"HF_ENDPOINT": hf_hub.base_url}
    code, err, _ = run_init("hf://org/m@main", tmp_path / "mnt", tmp_path / "none",
                            f"http://127.0.0.1:{free_port()}", tmp_path / "no-token",
                            "--mode", "download", env=env)
    assert code == 0, err
    assert mounted(tmp_path / "mnt") == hf_hub.files("org/m")


def test_the_warm_path_imports_no_event_loop_nor_http_framework(
        tmp_path: Path, model_server: tuple[FaultyServer, dict[str, bytes], str]) -> None:
    """A warm node's init container asks the agent with the standard library's HTTP client
    and links the tree: neither asyncio nor aiohttp (nor the fetch engine) is imported, and
    the agent still counts the hit."""
    _, files, uri = model_server
    store = tmp_path / "store"
    with AgentProcess(store, log_dir=tmp_path) as agent:
        key = agent.ensure(uri)["key"]
        assert agent.wait_ready(key)["state"] == "ready"
        mount = tmp_path / "mnt"
        argv = [sys.executable, "-X", "importtime", "-m", "agent", "init", "--uri", uri,
                "--mount-path", str(mount), "--side-path", str(store / "models" / key),
                "--agent-url", agent.url, "--token-file", str(store / "admin-token")]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        assert mounted(mount) == files
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "agent.cli.podinit" in imported and "http.client" in imported
        assert not imported & {"asyncio", "aiohttp", "agent.cli.podpull", "agent.fetch.engine"}
        status, metrics = agent.call("GET", "/metrics")
        assert status == 200
        assert 'modelcache_cache_requests_total{result="hit"} 1.0' in metrics

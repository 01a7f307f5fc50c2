"""A real agent process with ``verifyPolicies`` in its config file, the ``modelcache`` CLI
and the injected init container (``modelcache init``) against it: the API and the CLI show
``verified``; a policy the agent cannot load is named at start-up or refused at the request;
a rotated key has the model checked again; the init container links only a model verified
under its own policy, and never falls back to an unverified download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.trees import MANIFEST
from tests.agent.test_podinit import mounted, run_init
from tests.servers.agent import REPO, AgentProcess
from tests.servers.hfhub import HubServer
from tests.verify.signing import KeyPair, Signer

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.slow  # a real agent process per test, models signed by the CLI


def model_files() -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "test"}',
            "model.safetensors": os.urandom(300_000)}


def config(hub: HubServer, policies: dict[str, Path]) -> str:
    lines = [f"sources: {{hfEndpoint: {json.dumps(hub.base_url)}}}", "verifyPolicies:"]
    lines += [f"  {name}: {{publicKey: {path}}}" for name, path in policies.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def release_key(keys: dict[str, KeyPair], tmp_path: Path) -> Path:
    """A copy of the release key where the config file names it (rotated by a test)."""
    path = tmp_path / "keys" / "release.pub"
    path.parent.mkdir()
    path.write_bytes(keys["release"].public.read_bytes())
    return path


@pytest.fixture
def agent(tmp_path: Path, hf_hub: HubServer, release_key: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "store", log_dir=tmp_path,
                        config=config(hf_hub, {"release": release_key})).start()
    yield proc
    proc.stop()


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", *args, "--agent", agent.url,
            "--token-file", str(agent.store / "admin-token")]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)


def test_api_and_cli_show_verified(agent: AgentProcess, hf_hub: HubServer, signer: Signer,
                                   keys: dict[str, KeyPair]) -> None:
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", signer.with_key(model_files(), keys["release"]))

    pulled = cli(agent, "pull", "hf://org/m", "--verify", "release", "--wait")
    assert pulled.returncode == 0, pulled.stderr
    key, state, *_ = pulled.stdout.split()
    assert state == "ready"
    assert "verified: policy release (publicKey), signed by key sha256:" in pulled.stdout

    status, model = agent.call("GET", f"/api/v1/models/{key}")
    assert status == 200 and model["verified"]["policy"] == "release"
    assert set(model["verified"]) == {"policy", "signer", "time", "method"}
    table = cli(agent, "ls").stdout.splitlines()
    assert table[1].split()[:2] == [key, "ready"] and " release " in table[1]
    status, metrics = agent.call("GET", "/metrics")
    assert 'modelcache_verifications_total{result="passed"} 1.0' in metrics

    status, body = agent.call("POST", "/api/v1/models", {"uri": "hf://org/m", "verify": "nope"})
    assert status == 400 and body["error"].startswith(
        "verify policy 'nope' is not configured on this agent")
    status, body = agent.call("POST", "/api/v1/models", {"uri": "hf://org/m", "verify": "No!"})
    assert status == 400 and "is not a ConfigMap name" in body["error"]
    unsigned = agent.ensure("hf://org/m")
    assert unsigned["key"] != key and agent.wait_ready(unsigned["key"])["verified"] is None


def test_a_rotated_key_has_the_model_checked_again(
        agent: AgentProcess, hf_hub: HubServer, signer: Signer, keys: dict[str, KeyPair],
        release_key: Path) -> None:
    hf_hub.create_repo("org/m")
    hf_hub.commit("org/m", signer.with_key(model_files(), keys["release"]))
    key = agent.ensure("hf://org/m", verify="release")["key"]
    assert agent.wait_ready(key)["state"] == "ready"

    release_key.write_bytes(keys["stranger"].public.read_bytes())  # the policy now trusts
    model = agent.ensure("hf://org/m", verify="release")  # another key only
    model = agent.wait_ready(key)

    assert model["state"] == "failed" and model["verified"] is None
    assert "Key mismatch" in model["error"]
    manifest = json.loads((agent.store / "models" / key / MANIFEST).read_text())
    assert manifest["verified"] is None, "no pod is handed it from now on"


def test_a_broken_policy_is_named_at_start_up(tmp_path: Path, hf_hub: HubServer) -> None:
    broken = tmp_path / "broken.pub"
    broken.write_text("no key here\n")
    agent = AgentProcess(tmp_path / "store", log_dir=tmp_path,
                         config=config(hf_hub, {"corp": broken}))
    argv = [sys.executable, "-m", "agent", "agent", "--standalone", "--store",
            str(agent.store), "--listen", "127.0.0.1:0", *agent.extra_args]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode != 0
    assert "verify policy 'corp': publicKey is not a PEM public key" in done.stderr


def test_init_container_links_only_a_model_verified_under_its_policy(
        agent: AgentProcess, hf_hub: HubServer, signer: Signer, keys: dict[str, KeyPair],
        tmp_path: Path) -> None:
    files = signer.with_key(model_files(), keys["release"])
    hf_hub.create_repo("org/m", gitattributes=False)
    hf_hub.commit("org/m", files)
    token = agent.store / "admin-token"
    verified_key = agent.ensure("hf://org/m", verify="release")["key"]
    side = agent.store / "models" / verified_key

    code, err, _ = run_init("hf://org/m", tmp_path / "ok", side, agent.url, token,
                            "--verify", "release")
    assert code == 0, err
    assert mounted(tmp_path / "ok") == files

    # an unverified copy of the same model (pulled without a policy) is not handed over
    # under the policy, even when the side mount shows it: the key, and the gate, differ
    plain_key = agent.ensure("hf://org/m")["key"]
    assert agent.wait_ready(plain_key)["state"] == "ready"
    code, err, _ = run_init("hf://org/m", tmp_path / "plain", agent.store / "models" / plain_key,
                            "http://127.0.0.1:1", token, "--verify", "release")
    assert code == 1 and "a download from the source cannot be verified here" in err
    assert mounted(tmp_path / "plain") == {}

    # a manifest whose check was removed (as after a failed re-check) is refused as well,
    # even while the agent is unreachable
    manifest_path = side / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "verified": None}))
    code, err, _ = run_init("hf://org/m", tmp_path / "revoked", side, "http://127.0.0.1:1",
                            token, "--verify", "release")
    assert code == 1
    assert "carries no passing signature check under it; refusing to serve it" in err
    assert mounted(tmp_path / "revoked") == {}

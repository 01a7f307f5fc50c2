"""The admin HTTP API of DESIGN.md: every endpoint, its exact JSON shape, auth on writes,
errors as ``{"error": ...}`` with a fitting status, blobs with Range, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import blake3
import pytest
import yaml

from tests.servers.agent import REPO, AgentProcess, InProcessAgent, agent_settings
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.net import fetch, wait_until

MiB = 1024 * 1024
MODEL_KEYS = {"key", "uri", "revision", "state", "files", "size_bytes", "bytes_done",
              "last_used", "pinned", "in_use", "error", "verified"}
STORE_KEYS = {"path", "capacity_bytes", "used_bytes", "cache_bytes", "blobs",
              "dedup_saved_bytes", "high_watermark", "low_watermark"}


async def test_endpoints_and_shapes(tmp_path: Path, faulty: FaultyServer) -> None:
    data = os.urandom(MiB + 5)
    faulty.add("/w.safetensors", data)
    async with InProcessAgent(agent_settings(tmp_path)) as agent, \
            aiohttp.ClientSession(agent.url) as http:
        auth = {"Authorization": f"Bearer {agent.token}"}
        async with http.get("/healthz") as r:
            assert r.status == 200
        async with http.get("/readyz") as r:
            assert r.status == 200
        async with http.post("/api/v1/models", json={"uri": faulty.url("/w.safetensors")},
                             headers=auth) as r:
            assert r.status == 202
            model = await r.json()
        assert set(model) == MODEL_KEYS
        assert model["state"] in ("pulling", "ready")
        key = model["key"]
        async with http.get(f"/api/v1/models/{key}", params={"wait": "30"}) as r:
            model = await r.json()
        assert r.status == 200 and set(model) == MODEL_KEYS
        assert model["state"] == "ready" and model["error"] is None
        assert model["size_bytes"] == model["bytes_done"] == len(data)
        assert model["files"] == [{"path": "w.safetensors", "size": len(data),
                                   "blake3": blake3.blake3(data).hexdigest()}]
        assert model["revision"] and model["last_used"].endswith("Z")
        assert model["pinned"] is False and model["in_use"] is False
        # idempotent: asking again is the same model, a hit
        async with http.post("/api/v1/models", json={"uri": faulty.url("/w.safetensors")},
                             headers=auth) as r:
            assert r.status == 202 and (await r.json())["key"] == key
        async with http.get("/api/v1/models") as r:
            listing = await r.json()
        assert list(listing) == ["models"] and [m["key"] for m in listing["models"]] == [key]
        async with http.get("/api/v1/store") as r:
            store = await r.json()
        assert set(store) == STORE_KEYS
        assert store["path"] == str(tmp_path / "store")
        assert store["blobs"] == 1 and store["cache_bytes"] == len(data)
        assert store["capacity_bytes"] > store["used_bytes"] > 0
        assert (store["high_watermark"], store["low_watermark"]) == (0.8, 0.7)
        # blobs: for peers only, with Range
        digest = model["files"][0]["blake3"]
        async with http.get(f"/api/v1/blobs/{digest}") as r:
            assert r.status == 401
        async with http.get(f"/api/v1/blobs/{digest}", headers={**auth, "Range": "bytes=5-14"}
                            ) as r:
            assert r.status == 206 and await r.read() == data[5:15]
        async with http.get(f"/api/v1/blobs/{digest}", headers=auth) as r:
            assert r.status == 200 and await r.read() == data
        async with http.get("/metrics") as r:
            text = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        samples = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
                   for line in text.splitlines() if line and not line.startswith("#")}
        for name, value in (('modelcache_cache_requests_total{result="hit"}', 1),
                            ('modelcache_cache_requests_total{result="miss"}', 1),
                            ('modelcache_pulled_bytes_total{scheme="http"}', len(data)),
                            ('modelcache_models{state="ready"}', 1),
                            ('modelcache_store_bytes{kind="cached"}', len(data)),
                            ('modelcache_served_bytes_total{to="peer"}', 10 + len(data)),
                            ('modelcache_agent_info{node="test-node",version="0.1.0"}', 1),
                            ('modelcache_store_watermark_ratio{level="high"}', 0.8),
                            ('modelcache_store_watermark_ratio{level="low"}', 0.7)):
            assert samples.get(name) == value, (name, samples.get(name))
        # delete: the model is gone with the blob only it used; gc finds nothing more
        async with http.delete(f"/api/v1/models/{key}", headers=auth) as r:
            gone = await r.json()
        assert r.status == 200 and gone["state"] == "evicted"
        assert gone["freed_bytes"] == len(data)
        async with http.get(f"/api/v1/models/{key}") as r:
            assert r.status == 404 and "not in the store" in (await r.json())["error"]
        async with http.post("/api/v1/gc", headers=auth) as r:
            assert r.status == 200 and (await r.json())["freed_bytes"] == 0


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("POST", "/api/v1/models", {"uri": "ftp://x/y"}, 400, "unknown scheme 'ftp'"),
    ("POST", "/api/v1/models", {"uri": "hf://a/b", "include": "x"}, 400, "list of glob"),
    ("POST", "/api/v1/models", {"uri": "hf://a/b", "bogus": 1}, 400,
     "unknown field(s) in body: bogus"),
    ("POST", "/api/v1/models", {"nouri": 1}, 400, '"uri"'),
    ("POST", "/api/v1/models", {"uri": "hf://a/b\udcbf"}, 400, "URI is not valid UTF-8"),
    ("POST", "/api/v1/models", {"uri": "hf://a/b", "include": ["\ud800*.json"]}, 400,
     "is not valid UTF-8"),
    ("POST", "/api/v1/models", {"uri": "pvc://claim/x"}, 403, "mounted by the webhook"),
    ("POST", "/api/v1/models", {"uri": "file:///etc"}, 403, "--allow-path"),
    ("GET", "/api/v1/models/NOTAKEY", None, 400, "24 lowercase hex"),
    ("GET", "/api/v1/models/0123456789abcdef01234567", None, 404, "not in the store"),
    ("GET", "/api/v1/models/0123456789abcdef01234567?wait=x", None, 404, "not in the store"),
    ("DELETE", "/api/v1/models/0123456789abcdef01234567", None, 404, "not in the store"),
    ("GET", "/api/v1/blobs/xyz", None, 400, "64 lowercase hex"),
    ("GET", "/api/v1/blobs/" + "0" * 64, None, 404, "not in the store"),
    ("GET", "/nope", None, 404, "Not Found"),
])
async def test_errors_are_json_with_fitting_status(tmp_path: Path, method: str, path: str,
                                                   body: object, status: int,
                                                   words: str) -> None:
    async with InProcessAgent(agent_settings(tmp_path)) as agent, \
            aiohttp.ClientSession(agent.url) as http:
        auth = {"Authorization": f"Bearer {agent.token}"}
        async with http.request(method, path, json=body, headers=auth) as r:
            reply = await r.json()
        assert r.status == status, reply
        assert list(reply) == ["error"] and words in reply["error"], reply


async def test_writes_need_the_token_reads_do_not(tmp_path: Path) -> None:
    async with InProcessAgent(agent_settings(tmp_path)) as agent, \
            aiohttp.ClientSession(agent.url) as http:
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-123456"}, 401),
                                ({"Authorization": "Basic xyz"}, 401)):
            async with http.post("/api/v1/models", json={"uri": "hf://a/b"},
                                 headers=headers) as r:
                assert r.status == status
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in (await r.json())["error"]
            async with http.post("/api/v1/gc", headers=headers) as r:
                assert r.status == 401
        async with http.get("/api/v1/models") as r:
            assert r.status == 200
        async with http.post("/api/v1/models", data=b"{", headers={
                "Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"}
                             ) as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
        async with http.post("/api/v1/models", data=b"x" * (128 * 1024), headers={
                "Authorization": f"Bearer {agent.token}", "Content-Type": "application/json"}
                             ) as r:
            assert r.status == 413
    # the token file was created, private
    assert (tmp_path / "token").stat().st_mode & 0o077 == 0


async def test_wait_holds_the_reply_until_the_pull_ends(tmp_path: Path,
                                                        faulty: FaultyServer) -> None:
    import threading

    gate = threading.Event()
    faulty.add("/w.bin", os.urandom(1000))
    faulty.fault("/w.bin", Fault(hold=gate, methods=("GET",)))
    async with InProcessAgent(agent_settings(tmp_path)) as agent, agent.client() as client:
        model = await client.ensure(faulty.url("/w.bin"))
        pending = await client.model(model["key"], wait=0.2)
        assert pending["state"] == "pulling"
        gate.set()
        done = await client.model(model["key"], wait=30)
        assert done["state"] == "ready"


@pytest.mark.slow
def test_sigterm_stops_gracefully_and_the_pull_resumes(tmp_path: Path,
                                                       faulty: FaultyServer) -> None:
    data = os.urandom(6 * MiB)
    faulty.add("/slow.bin", data)
    faulty.always("/slow.bin", Fault(rate=2 * MiB, methods=("GET",)))
    store = tmp_path / "store"
    agent = AgentProcess(store, log_dir=tmp_path).start()
    try:
        key = agent.ensure(faulty.url("/slow.bin"))["key"]
        wait_until(lambda: faulty.bytes_sent("/slow.bin") > MiB, timeout=20, what="bytes")
        assert agent.stop() == 0, agent.log()
        assert "agent stopped" in agent.log()
        assert (store / "pulls" / f"{key}.json").exists()
        faulty.always("/slow.bin", None)
        agent.start()
        assert agent.wait_ready(key)["state"] == "ready"
    finally:
        agent.stop()
    assert faulty.bytes_sent_twice("/slow.bin") == 0, "progress was checkpointed at shutdown"


@pytest.mark.slow
def test_config_file_models_are_prefetched_and_pinned(tmp_path: Path,
                                                      faulty: FaultyServer) -> None:
    faulty.add("/a.bin", b"a" * 1000)
    faulty.add("/b.bin", b"b" * 1000)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"uri": faulty.url("/a.bin"), "pin": True},
        {"uri": faulty.url("/b.bin")},
    ]}))
    agent = AgentProcess(tmp_path / "store", log_dir=tmp_path,
                         extra_args=["--config", str(config)]).start()
    try:
        def both_ready() -> list[dict[str, object]] | None:
            status, body = agent.call("GET", "/api/v1/models")
            assert status == 200
            models = body["models"]
            return models if len(models) == 2 and all(m["state"] == "ready" for m in models) \
                else None

        models = wait_until(both_ready, timeout=20, what="prefetched models")
        pinned = {m["uri"].rsplit("/", 1)[1]: m["pinned"] for m in models}
        assert pinned == {"a.bin": True, "b.bin": False}
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_bad_config_file_is_refused_with_the_field_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  - uri: hf://ok/model\n    pin: maybe\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "agent", "--standalone", "--store",
         str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert "models/0/pin" in proc.stderr and "'maybe' is not of type 'boolean'" in proc.stderr


@pytest.mark.slow
def test_healthz_is_not_logged_and_logs_are_json(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "store", log_dir=tmp_path).start()
    try:
        for _ in range(3):
            assert fetch(agent.url + "/healthz").status == 200
    finally:
        agent.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        agent.stop()
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "agent ready" for line in lines)
    assert not any("/healthz" in json.dumps(line) for line in lines)
    assert not any(agent.token in json.dumps(line) for line in lines)

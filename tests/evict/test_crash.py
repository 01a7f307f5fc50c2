"""kill -9 of a real agent process in the middle of an eviction, then a restart.

The store is seeded with thousands of small models and the agent is started with a quota
that a tenth of them fill, so its first check evicts most of them, batch by batch; it is
killed with SIGKILL as soon as it has logged its first eviction. On disk, each model must
then be complete or invisible; after a restart the agent's index and the disk must agree.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.evict.helpers import TOKEN, blob_digests, visible_models
from tests.evict.seed import seed_store, uri_of, write_leases
from tests.servers.net import fetch, free_port, wait_until
from tests.servers.proc import ManagedProcess

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


def start_agent(store: Path, tmp: Path, name: str, *flags: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    token = tmp / "token"
    token.write_text(TOKEN)
    proc = ManagedProcess(
        [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(store),
         "--listen", f"127.0.0.1:{port}", "--token-file", str(token), *flags],
        name=name, log_dir=tmp, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    ).start()
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_sigkill_during_eviction_leaves_every_model_complete_or_invisible(
        tmpfs: Callable[..., Path], tmp_path: Path) -> None:
    fs = tmpfs(256)
    store = fs / "store"
    seeded = seed_store(store, 2000)
    pinned, leased = seeded.keys[0], seeded.keys[1]  # the two least recently used
    _pin(store, pinned)
    write_leases(store, {leased: {"job": time.time() + 3600}})

    proc, _ = start_agent(store, tmp_path, "agent-1", "--quota-bytes",
                          str(seeded.cache_bytes // 10))
    try:
        deadline = time.monotonic() + 30
        while '"msg": "evicted model"' not in proc.log_tail(20_000):
            assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.001)
        proc.kill()
    finally:
        proc.stop()
    evicted = proc.log_tail(10_000_000).count('"msg": "evicted model"')

    on_disk = visible_models(store)  # each visible model is complete and verified
    assert pinned in on_disk and leased in on_disk
    assert len(on_disk) < len(seeded.keys), "it was killed after evicting some"
    assert len(on_disk) > len(seeded.keys) // 10 + 50, "and long before it was done"
    assert len(seeded.keys) - len(on_disk) >= evicted

    proc, url = start_agent(store, tmp_path, "agent-2")
    try:
        wait_until(lambda: fetch(url + "/readyz").status == 200, timeout=30,
                   alive=proc.alive, what="the restarted agent")
        models = fetch(url + "/api/v1/models").json()["models"]
        info = fetch(url + "/api/v1/store").json()
    finally:
        proc.stop()
    assert {m["key"] for m in models} == set(on_disk), "the index and the disk agree"
    assert all(m["state"] == "ready" for m in models)
    assert {m["key"]: m["in_use"] for m in models}[leased]
    blobs = blob_digests(store)
    referenced = {f.blake3 for m in on_disk.values() for f in m.files}
    assert set(blobs) == referenced, "no blob is left without a model, none is missing"
    assert info["cache_bytes"] == sum(blobs.values())
    for model_dir in (store / "models").iterdir():
        trees = {p.name for p in model_dir.iterdir() if p.name.startswith("t-")}
        assert trees == ({on_disk[model_dir.name].tree} if model_dir.name in on_disk else set())


def _pin(store: Path, key: str) -> None:
    from dataclasses import replace

    from agent.store.local import Store
    from agent.store.recovery import recover

    s = Store(store)
    recover(s)
    manifest = s.manifest(key)
    assert manifest is not None and manifest.uri == uri_of(0)
    s.update_manifest(replace(manifest, pinned=True))

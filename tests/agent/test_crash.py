"""A real agent process killed with SIGKILL mid-pull, restarted on the same store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.agent.test_pull_http import assert_store_consistent
from tests.servers.agent import AgentProcess
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.net import wait_until

MiB = 1024 * 1024


def checkpointed_bytes(store: Path) -> int:
    total = 0
    for state in (store / "partial").glob("*/state.json"):
        try:
            total += sum(done for _, _, done in json.loads(state.read_text())["segments"])
        except (OSError, ValueError, KeyError):
            continue
    return total


@pytest.mark.slow
def test_sigkill_mid_pull_then_restart_resumes_and_completes(tmp_path: Path,
                                                             faulty: FaultyServer) -> None:
    data = os.urandom(12 * MiB)
    small = b'{"architectures": ["Tiny"]}'
    faulty.add("/big.bin", data)
    faulty.add("/config.json", small)
    faulty.always("/big.bin", Fault(rate=3 * MiB, methods=("GET",)))
    store = tmp_path / "store"
    agent = AgentProcess(store, log_dir=tmp_path).start()
    try:
        done = agent.ensure(faulty.url("/config.json"))
        assert agent.wait_ready(done["key"])["state"] == "ready"
        model = agent.ensure(faulty.url("/big.bin"))
        key = model["key"]
        # killed once a checkpoint has recorded progress, while bytes are still flowing
        wait_until(lambda: checkpointed_bytes(store) >= 2 * MiB, timeout=20,
                   what="a checkpoint of the partial download")
        agent.kill()
        on_disk = checkpointed_bytes(store)
        assert 0 < on_disk < len(data)
        assert not (store / "models" / key / "manifest.json").exists()
        assert (store / "pulls" / f"{key}.json").exists(), "the pull intent survives the crash"

        faulty.always("/big.bin", None)
        agent.start()
        model = agent.wait_ready(key)
        assert model["state"] == "ready", model["error"]
        tree = json.loads((store / "models" / key / "manifest.json").read_text())["tree"]
        assert (store / "models" / key / tree / "big.bin").read_bytes() == data
        # the model pulled before the crash is still there, untouched
        status, ready = agent.call("GET", f"/api/v1/models/{done['key']}")
        assert status == 200 and ready["state"] == "ready"
    finally:
        agent.stop()
    resumed = [g for g in faulty.gets("/big.bin") if g.range and not g.range.startswith("bytes=0-")]
    assert resumed, "after the restart the download resumed from its checkpoint"
    assert resumed[-1].start >= on_disk
    assert faulty.bytes_sent("/big.bin") < 2 * len(data)
    assert not list((store / "partial").iterdir())
    assert not list((store / "pulls").iterdir())
    assert_store_consistent(store)

"""The CSI node service of a real agent process (standalone, as root), called as kubelet
calls it, with real read-only bind mounts under the test's directory."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import stat
import threading
from pathlib import Path

import grpc
import pytest

from agent.csi import mounts
from agent.csi.proto import csi_pb2 as pb
from tests.csi.conftest import csi_args, mounts_under, write_model
from tests.csi.kubelet import Kubelet, Pod, PublishFailed
from tests.csi.pod import UID, read_as_pod
from tests.servers.agent import AgentProcess
from tests.servers.faulty import Fault, FaultyServer
from tests.servers.net import wait_until

FILES = {"config.json": b'{"model_type": "demo"}', "model.safetensors": os.urandom(300_000),
         "tokenizer/vocab.txt": b"a\nb\nc\n"}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def warm(agent: AgentProcess, uri: str) -> dict[str, object]:
    model = agent.ensure(uri)
    return agent.wait_ready(str(model["key"]), 30)


def metric(agent: AgentProcess, name: str) -> float:
    status, text = agent.call("GET", "/metrics", auth=False)
    assert status == 200
    match = re.search(rf"^{re.escape(name)} (\S+)$", str(text), re.M)
    assert match, name
    return float(match.group(1))


async def test_a_warm_model_is_mounted_read_only_for_any_uid(csi_agent: AgentProcess,
                                                             kubelet: Kubelet, seed: Path):
    uri = f"file://{write_model(seed / 'demo', FILES)}"
    model = warm(csi_agent, uri)
    published = await kubelet.publish(Pod(), "model", {"model": uri})
    assert published.retries == ()
    assert published.seconds < 0.5, "a warm model is published in well under a second"

    # the pod sees exactly the model's files, byte for byte, as an arbitrary uid
    seen = await asyncio.to_thread(read_as_pod, published.target)
    assert seen["uid"] == UID
    assert seen["files"] == digests(FILES)
    assert (seen["create"], seen["mkdir"]) == ("EROFS", "EROFS")
    assert seen["overwrite"] == "EACCES"  # the files are 0444, and the mount is read-only:
    # for root too, whom no file mode stops
    for write in (lambda: (published.target / "new-file").write_bytes(b"x"),
                  lambda: (published.target / "config.json").open("r+b"),
                  lambda: (published.target / "tokenizer" / "vocab.txt").unlink()):
        with pytest.raises(OSError) as refused:
            write()
        assert refused.value.errno == errno.EROFS
    (entry,) = mounts.mounted_at(published.target, mounts.mount_table())
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert not (published.target / "manifest.json").exists()  # nothing else of the store

    status, body = csi_agent.call("GET", f"/api/v1/models/{model['key']}")
    assert (status, body["in_use"]) == (200, True)
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 1
    assert metric(csi_agent, 'modelcache_csi_publishes_total{outcome="ok"}') == 1
    assert metric(csi_agent, 'modelcache_cache_requests_total{result="hit"}') == 1
    await kubelet.unpublish(published)
    assert not published.target.exists()
    status, body = csi_agent.call("GET", f"/api/v1/models/{model['key']}")
    assert (status, body["in_use"]) == (200, False)
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 0


async def test_publish_twice_is_once_and_unpublish_twice_is_once(csi_agent: AgentProcess,
                                                                 kubelet: Kubelet, seed: Path):
    uri = f"file://{write_model(seed / 'demo', FILES)}"
    pod = Pod()
    first = await kubelet.publish(pod, "model", {"model": uri})
    again = await kubelet.publish(pod, "model", {"model": uri})
    assert (again.target, again.retries) == (first.target, ())
    assert len(mounts.mounted_at(first.target, mounts.mount_table())) == 1
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 1
    # the same volume with another model is refused
    other = kubelet.publish_request(pod, "model", {"model": uri, "include": "*.json"})
    with pytest.raises(PublishFailed) as refused:
        await kubelet.publish_once(other)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "other volume attributes" in refused.value.message

    await kubelet.unpublish(first)
    await kubelet.unpublish(first)  # kubelet retries: the target is gone, still OK
    assert not first.target.exists()
    assert mounts_under(kubelet.root) == []
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 0


async def test_a_published_model_is_never_evicted(csi_agent: AgentProcess, kubelet: Kubelet,
                                                  seed: Path):
    uri = f"file://{write_model(seed / 'demo', FILES)}"
    key = warm(csi_agent, uri)["key"]
    published = await kubelet.publish(Pod(name="reader"), "model", {"model": uri})
    status, body = csi_agent.call("DELETE", f"/api/v1/models/{key}")
    assert status == 409 and "in use (csi:" in body["error"], body
    status, _ = csi_agent.call("POST", "/api/v1/gc")
    assert status == 200
    status, body = csi_agent.call("GET", f"/api/v1/models/{key}")
    assert (status, body["state"]) == (200, "ready")
    assert (await asyncio.to_thread(read_as_pod, published.target))["files"] == digests(FILES)
    await kubelet.unpublish(published)
    status, body = csi_agent.call("DELETE", f"/api/v1/models/{key}")
    assert (status, body["state"]) == (200, "evicted")


async def test_a_cold_model_is_published_after_retries_once_pulled(
        csi_agent: AgentProcess, kubelet: Kubelet, faulty: FaultyServer):
    data = os.urandom(4 * 1024 * 1024)
    faulty.add("/big.bin", data)
    gate = threading.Event()
    faulty.fault("/big.bin", Fault(stall_after=1024 * 1024, hold=gate, methods=("GET",)))
    uri = faulty.url("/big.bin")
    try:
        publishing = asyncio.create_task(kubelet.publish(Pod(), "model", {"model": uri}))
        await asyncio.to_thread(faulty.wait_for,
                                lambda s: s.bytes_sent("/big.bin") >= 1024 * 1024)
        while len(kubelet.attempts) < 2:  # kubelet has been told twice to come back
            await kubelet.attempted.wait()
            kubelet.attempted.clear()
    finally:
        gate.set()
    published = await publishing
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in published.retries)
    assert any(re.search(r": pulling \d+% of 4\.0 MiB, [\d.]+ [kMG]?B/s$", message)
               for _, message in published.retries), published.retries
    assert (published.target / "big.bin").read_bytes() == data
    assert metric(csi_agent, 'modelcache_csi_publishes_total{outcome="pending"}') >= 2
    assert metric(csi_agent, "modelcache_csi_publish_wait_seconds_count") == 1
    # one cache request for the volume, however often kubelet asked
    assert metric(csi_agent, 'modelcache_cache_requests_total{result="miss"}') == 1
    assert metric(csi_agent, 'modelcache_cache_requests_total{result="hit"}') == 0
    # the publish also had the model read into the page cache, once it was pulled, while
    # kubelet went on with the pod (its image pull)
    await asyncio.to_thread(
        wait_until, lambda: metric(csi_agent, "modelcache_pagecache_warmings_total") >= 1,
        what="the page-cache warming the publish started")
    assert metric(csi_agent, "modelcache_pagecache_warmings_total") == 1
    await kubelet.unpublish(published)


@pytest.mark.slow
async def test_sigkill_keeps_the_mounts_in_use_and_unpublish_works_after_restart(
        csi_agent: AgentProcess, kubelet: Kubelet, seed: Path):
    uri = f"file://{write_model(seed / 'demo', FILES)}"
    key = warm(csi_agent, uri)["key"]
    pods = [Pod(name=f"web-{i}") for i in range(2)]
    published = [await kubelet.publish(p, "model", {"model": uri}) for p in pods]
    csi_agent.kill()
    for p in published:  # the kernel holds the mounts: the pods keep reading
        assert (await asyncio.to_thread(read_as_pod, p.target))["files"] == digests(FILES)

    csi_agent.start()
    status, body = csi_agent.call("GET", f"/api/v1/models/{key}")
    assert (status, body["in_use"]) == (200, True)
    status, body = csi_agent.call("DELETE", f"/api/v1/models/{key}")
    assert status == 409, body
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 2
    await kubelet.unpublish(published[0])
    status, body = csi_agent.call("DELETE", f"/api/v1/models/{key}")
    assert status == 409, "the other volume still uses it"
    await kubelet.unpublish(published[1])
    assert mounts_under(kubelet.root) == []
    status, body = csi_agent.call("DELETE", f"/api/v1/models/{key}")
    assert status == 200, body


@pytest.mark.slow
async def test_a_record_without_its_mount_is_dropped_at_start(csi_agent: AgentProcess,
                                                              kubelet: Kubelet, seed: Path):
    """The crash came after the record and before the mount (or the mount went away)."""
    uri = f"file://{write_model(seed / 'demo', FILES)}"
    key = warm(csi_agent, uri)["key"]
    published = await kubelet.publish(Pod(), "model", {"model": uri})
    csi_agent.kill()
    mounts.unmount(published.target)
    csi_agent.start()
    status, body = csi_agent.call("GET", f"/api/v1/models/{key}")
    assert (status, body["in_use"]) == (200, False)
    assert metric(csi_agent, "modelcache_csi_volumes_published") == 0
    await kubelet.unpublish(published)
    assert not published.target.exists()


def _request(kubelet: Kubelet, seed: Path, case: str) -> pb.NodePublishVolumeRequest:
    uri = f"file://{seed / 'demo'}"
    req = kubelet.publish_request(Pod(), "model", {"model": uri})
    if case == "no volume id":
        req.volume_id = ""
    elif case == "no target path":
        req.target_path = ""
    elif case == "target outside kubelet's pods":
        req.target_path = str(seed.parent / "elsewhere")
    elif case == "target not clean":
        req.target_path = req.target_path.replace("/mount", "/../mount")
    elif case == "no capability":
        req.ClearField("volume_capability")
    elif case == "block capability":
        req.volume_capability.block.SetInParent()
    elif case == "no access mode":
        req.volume_capability.ClearField("access_mode")
    elif case == "mount flags":
        req.volume_capability.mount.mount_flags.append("rw")
    elif case == "no model":
        del req.volume_context["model"]
    elif case == "unknown attribute":
        req.volume_context["modle"] = uri
    elif case == "unknown scheme":
        req.volume_context["model"] = "ftp://host/model"
    elif case == "pvc":
        req.volume_context["model"] = "pvc://claim/dir"
    elif case == "bad include":
        req.volume_context["include"] = "../*"
    elif case == "bad credentials name":
        req.volume_context["credentials"] = "Not_A_Secret"
    elif case == "file outside allow-path":
        req.volume_context["model"] = f"file://{seed.parent / 'logs'}"
    elif case == "scheme not allowed":
        req.volume_context["model"] = "hf://org/name"
    else:
        raise AssertionError(case)
    return req


BAD = {
    "no volume id": grpc.StatusCode.INVALID_ARGUMENT,
    "no target path": grpc.StatusCode.INVALID_ARGUMENT,
    "target outside kubelet's pods": grpc.StatusCode.INVALID_ARGUMENT,
    "target not clean": grpc.StatusCode.INVALID_ARGUMENT,
    "no capability": grpc.StatusCode.INVALID_ARGUMENT,
    "block capability": grpc.StatusCode.INVALID_ARGUMENT,
    "no access mode": grpc.StatusCode.INVALID_ARGUMENT,
    "mount flags": grpc.StatusCode.INVALID_ARGUMENT,
    "no model": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown attribute": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown scheme": grpc.StatusCode.INVALID_ARGUMENT,
    "pvc": grpc.StatusCode.INVALID_ARGUMENT,
    "bad include": grpc.StatusCode.INVALID_ARGUMENT,
    "bad credentials name": grpc.StatusCode.INVALID_ARGUMENT,
    "file outside allow-path": grpc.StatusCode.PERMISSION_DENIED,
    "scheme not allowed": grpc.StatusCode.PERMISSION_DENIED,
}


async def test_bad_requests_get_their_code_and_mount_nothing(tmp_path: Path,
                                                             kubelet_root: Path, seed: Path,
                                                             kubelet: Kubelet):
    write_model(seed / "demo", FILES)
    config = "allowSchemes: [file, http]\n"  # hf:// not allowed on this node
    with AgentProcess(tmp_path / "store", allow_paths=[seed], log_dir=tmp_path / "logs",
                      config=config, extra_args=csi_args(tmp_path, kubelet_root)) as agent:
        for case, code in BAD.items():
            req = _request(kubelet, seed, case)
            Path(req.target_path or kubelet_root / "pods" / "x").parent.mkdir(
                parents=True, exist_ok=True)
            with pytest.raises(PublishFailed) as failed:
                await kubelet.publish_once(req)
            assert failed.value.code == code, (case, failed.value.message)
            assert failed.value.message, case
            assert mounts_under(tmp_path) == [], case
        invalid = sum(1 for c in BAD.values() if c == grpc.StatusCode.INVALID_ARGUMENT)
        assert metric(agent, 'modelcache_csi_publishes_total{outcome="invalid"}') == invalid
        assert metric(agent, 'modelcache_csi_publishes_total{outcome="denied"}') == \
            len(BAD) - invalid


async def test_unpublish_requests_are_checked(csi_agent: AgentProcess, kubelet: Kubelet,
                                              tmp_path: Path):
    for volume_id, target, message in (
            ("", str(kubelet.root / "pods/x/mount"), "volume_id is required"),
            ("v", "", "target_path is required"),
            ("v", str(tmp_path / "not-kubelet"), "not under kubelet's")):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await kubelet.node_call("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(
                volume_id=volume_id, target_path=target))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (failed.value.details() or "")
    # a target that is not mounted (and not even there) is success
    await kubelet.node_call("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(
        volume_id="never-published", target_path=str(kubelet.root / "pods/u/v/mount")))


async def test_identity_and_node_info(csi_agent: AgentProcess, kubelet: Kubelet):
    info = await kubelet.call("Identity", "GetPluginInfo", pb.GetPluginInfoRequest(),
                              pb.GetPluginInfoResponse)
    assert info.name == "csi.modelcache.io" and info.vendor_version
    caps = await kubelet.call("Identity", "GetPluginCapabilities",
                              pb.GetPluginCapabilitiesRequest(), pb.GetPluginCapabilitiesResponse)
    assert list(caps.capabilities) == []  # no controller service
    probe = await kubelet.call("Identity", "Probe", pb.ProbeRequest(), pb.ProbeResponse)
    assert probe.ready.value is True
    node = await kubelet.node_call("NodeGetInfo", pb.NodeGetInfoRequest())
    assert node.node_id == os.uname().nodename
    node_caps = await kubelet.node_call("NodeGetCapabilities", pb.NodeGetCapabilitiesRequest())
    assert list(node_caps.capabilities) == []
    with pytest.raises(grpc.aio.AioRpcError) as failed:  # no staging, no controller
        await kubelet.call("Node", "NodeStageVolume", pb.NodeUnpublishVolumeRequest(),
                           pb.NodeUnpublishVolumeResponse)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_socket_is_roots_only(csi_agent: AgentProcess, tmp_path: Path):
    socket = tmp_path / "plugin" / "csi.sock"
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700

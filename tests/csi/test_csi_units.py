"""The CSI plugin's parts on their own: the committed messages against csi.proto and the
spec's numbers, the mount table parser, request validation, progress text, publish records,
and the socket's permissions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given
from hypothesis import strategies as st

from agent.csi import mounts
from agent.csi.progress import not_ready_message, rate_text, size_text
from agent.csi.proto import csi_pb2 as pb
from agent.csi.records import Record, Records
from agent.csi.requests import TOKENS, publish_request
from agent.index import FAILED, PULLING, Model
from agent.main import build, csi_plugin
from common.errors import InvalidInput
from common.reference import parse
from tests.servers.agent import agent_settings

PROTO = Path(__file__).resolve().parents[2] / "agent" / "csi" / "proto"


# --- the messages ----------------------------------------------------------------------------


def test_the_committed_messages_are_generated_from_csi_proto(tmp_path: Path) -> None:
    out = tmp_path / "csi.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
                    f"--descriptor_set_out={out}", str(PROTO / "csi.proto")],
                   check=True, capture_output=True, timeout=60)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # a descriptor set has them, gencode does not
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "regenerate csi_pb2.py (see the header of csi.proto)"


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_names_and_numbers_are_the_specs() -> None:
    """What kubelet and csi-sanity send must decode: the CSI spec's package, method paths and
    field numbers (spec v1.12)."""
    assert pb.DESCRIPTOR.package == "csi.v1"
    services = {s.full_name: [m.name for m in s.methods]
                for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "csi.v1.Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
        "csi.v1.Node": ["NodePublishVolume", "NodeUnpublishVolume", "NodeGetCapabilities",
                        "NodeGetInfo"]}

    def numbers(message: object) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.NodePublishVolumeRequest) == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8}
    assert numbers(pb.NodeUnpublishVolumeRequest) == {"volume_id": 1, "target_path": 2}
    assert numbers(pb.VolumeCapability) == {"block": 1, "mount": 2, "access_mode": 3}
    assert numbers(pb.VolumeCapability.MountVolume) == {
        "fs_type": 1, "mount_flags": 2, "volume_mount_group": 3}
    assert numbers(pb.NodeGetInfoResponse) == {
        "node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}
    assert numbers(pb.GetPluginInfoResponse) == {"name": 1, "vendor_version": 2, "manifest": 3}
    assert numbers(pb.ProbeResponse) == {"ready": 1}
    mode = pb.VolumeCapability.AccessMode.Mode
    assert (mode.SINGLE_NODE_WRITER, mode.SINGLE_NODE_MULTI_WRITER) == (1, 7)


# --- the mount table -------------------------------------------------------------------------

CSI_TARGET = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/model/mount"
MOUNTINFO = f"""\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
30 22 259:2 /var/lib/modelcache/models/abc/t-0123456789abcdef {CSI_TARGET} \
ro,nosuid,nodev,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
31 22 0:45 / /mnt/with\\040space rw master:7 propagate_from:2 - tmpfs tmpfs rw,size=64m
32 22 259:3 / /data rw - xfs /dev/sdb rw
33 22 259:3 /store/models/k/t-1 /pods/x/mount ro - xfs /dev/sdb rw
garbage line
"""


def test_mountinfo_is_parsed_as_proc5_says() -> None:
    table = mounts.parse_mountinfo(MOUNTINFO)
    assert [m.mount_id for m in table] == [22, 30, 31, 32, 33]
    csi = table[1]
    assert csi.mount_point == CSI_TARGET
    assert csi.read_only and {"nosuid", "nodev"} <= csi.options
    assert table[2].mount_point == "/mnt/with space" and table[2].fs_type == "tmpfs"
    assert mounts.bind_source(csi, table) == \
        Path("/var/lib/modelcache/models/abc/t-0123456789abcdef")
    assert mounts.bind_source(table[4], table) == Path("/data/store/models/k/t-1")
    assert mounts.mounted_at(Path("/pods/x/mount"), table) == [table[4]]


@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
               max_size=40))
def test_escaped_mount_points_come_back_as_they_were(name: str) -> None:
    point = "/mnt/" + name
    escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in point)
    (entry,) = mounts.parse_mountinfo(f"40 22 0:50 / {escaped} rw - tmpfs tmpfs rw\n")
    assert entry.mount_point == point


def test_the_real_table_lists_the_root() -> None:
    assert any(m.mount_point == "/" for m in mounts.mount_table())


def test_a_bind_mount_is_read_only_and_undone(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    source.mkdir()
    target.mkdir()
    (source / "f").write_text("data")
    mounts.bind_read_only(source, target)
    try:
        (entry,) = mounts.mounted_at(target, mounts.mount_table())
        assert entry.read_only and (target / "f").read_text() == "data"
        assert mounts.bind_source(entry, mounts.mount_table()) == source
        with pytest.raises(OSError, match="Read-only"):
            (target / "g").write_text("x")
    finally:
        assert mounts.unmount(target)
    assert not mounts.unmount(target)  # nothing mounted: False, not an error
    with pytest.raises(mounts.MountError, match="cannot mount"):
        mounts.bind_read_only(tmp_path / "missing", target)


# --- requests ----------------------------------------------------------------------------------

PODS = Path("/var/lib/kubelet/pods")


def request(**context: str) -> pb.NodePublishVolumeRequest:
    mode = pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
    return pb.NodePublishVolumeRequest(
        volume_id="csi-1", target_path=f"{PODS}/u/volumes/kubernetes.io~csi/m/mount",
        volume_capability=pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(),
            access_mode=pb.VolumeCapability.AccessMode(mode=mode)),
        volume_context={"model": "hf://org/name@main", **context})


def test_a_request_as_kubelet_sends_it() -> None:
    tokens = json.dumps({"modelcache": {"token": "secret-token-value",
                                        "expirationTimestamp": "2030-01-01T00:00:00Z"}})
    req = publish_request(request(**{
        "include": "*.json,*.safetensors", "credentials": "hub-token",
        "csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "ml",
        "csi.storage.k8s.io/pod.uid": "u", "csi.storage.k8s.io/serviceAccount.name": "sa",
        "csi.storage.k8s.io/ephemeral": "true", TOKENS: tokens}), PODS)
    assert req.ref == parse("hf://org/name@main", "*.json,*.safetensors")
    assert (req.credentials, req.pod.key, req.pod.service_account) == ("hub-token", "ml/web-0",
                                                                        "sa")
    assert req.pod.tokens == {"modelcache": "secret-token-value"}
    assert "secret-token-value" not in repr(req)


@given(st.text(max_size=200))
def test_a_malformed_tokens_value_is_refused_without_echoing_it(value: str) -> None:
    try:
        req = publish_request(request(**{TOKENS: value}), PODS)
    except InvalidInput as e:
        assert value not in str(e) or len(value) < 4
        return
    assert all(isinstance(t, str) for t in req.pod.tokens.values())


@given(st.dictionaries(st.text(min_size=1, max_size=20).filter(
    lambda k: k not in ("model", "include", "credentials")
    and not k.startswith("csi.storage.k8s.io/")), st.text(max_size=10), min_size=1,
    max_size=3))
def test_every_unknown_attribute_is_named(extra: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="unknown attribute") as refused:
        publish_request(request(**extra), PODS)
    assert all(k in str(refused.value) for k in extra)


@given(st.text(max_size=60))
def test_a_target_is_a_clean_path_under_kubelets_pods(suffix: str) -> None:
    req = request()
    req.target_path = f"{PODS}/{suffix}"
    try:
        out = publish_request(req, PODS)
    except InvalidInput:
        return
    assert out.target.is_relative_to(PODS) and out.target != PODS
    assert ".." not in out.target.parts and str(out.target) == os.path.normpath(out.target)


# --- progress text -------------------------------------------------------------------------


def test_sizes_and_rates_read_as_people_quote_them() -> None:
    assert [size_text(n) for n in (512, 1536, 14.2 * 2**30, 300 * 2**20)] == \
        ["512 B", "1.5 KiB", "14.2 GiB", "300 MiB"]
    assert [rate_text(r) for r in (0, 5_500, 310e6, 1.2e9)] == \
        ["0.0 B/s", "5.5 kB/s", "310 MB/s", "1.2 GB/s"]


def test_what_kubelet_is_told_while_it_waits() -> None:
    model = Model(parse("hf://org/name@main"), PULLING, bytes_total=int(14.2 * 2**30),
                  bytes_done=6 * 2**30, started=time.time() - 20)
    text = not_ready_message(model, 310e6)
    assert text == f"model {model.key} (hf://org/name@main): pulling 42% of 14.2 GiB, 310 MB/s"
    model.bytes_total = 0
    assert not_ready_message(model, 0).endswith("resolving the revision and listing files")
    model.state, model.error = FAILED, "hf://org/name: 404 Repository not found"
    assert "the pull failed: hf://org/name: 404" in not_ready_message(model, 0)


# --- records -------------------------------------------------------------------------------


def test_records_survive_a_restart_and_bad_files_are_left_alone(tmp_path: Path) -> None:
    records = Records(tmp_path)
    first = Record("csi-1", "/pods/u/mount", "k" * 24, "t-0123456789abcdef", "hf://o/n",
                   ("*.json",), "hub", "ml", "ml/web-0", "u", 1.5)
    records.put(first)
    records.put(Record("csi-2", "/pods/v/mount", "k" * 24, "t-0123456789abcdef", "hf://o/n"))
    (tmp_path / "csi" / ("0" * 32 + ".json")).write_text("{not json")
    assert oct((tmp_path / "csi").stat().st_mode & 0o777) == "0o700"
    again = Records(tmp_path)
    assert sorted(r.volume_id for r in again.load()) == ["csi-1", "csi-2"]
    assert again.get("csi-1") == first
    assert again.remove("csi-2") is not None and again.remove("csi-2") is None
    assert [r.volume_id for r in Records(tmp_path).load()] == ["csi-1"]


# --- the socket ----------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any uid can traverse (pytest's own are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="modelcache-csi-"))
    os.chmod(path, 0o755)  # noqa: S103 - the point of the test: the socket alone must refuse
    yield path
    shutil.rmtree(path)


async def test_only_root_can_connect_to_the_socket(tmp_path: Path, open_dir: Path) -> None:
    socket = open_dir / "plugin" / "csi.sock"
    settings = agent_settings(tmp_path)
    from dataclasses import replace

    settings = replace(settings, csi=replace(settings.csi, endpoint=f"unix://{socket}"))
    deps = await build(settings)
    plugin = csi_plugin(deps)
    assert plugin is not None
    socket.parent.mkdir()
    socket.write_text("not a socket")
    with pytest.raises(InvalidInput, match="is not a socket"):
        await plugin.start()
    socket.unlink()
    await plugin.start()
    try:
        assert oct(socket.stat().st_mode & 0o777) == "0o600"
        os.chmod(socket.parent, 0o755)  # noqa: S103 - only the socket's own mode stands now
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(socket)!r})"
        proc = subprocess.run(["setpriv", "--reuid", "65532", "--regid", "65532",
                               "--clear-groups", sys.executable, "-c", connect],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode != 0 and "PermissionError" in proc.stderr, proc.stderr
    finally:
        await plugin.stop(1.0)
        await deps.puller.fetcher.close()
    assert not socket.exists()

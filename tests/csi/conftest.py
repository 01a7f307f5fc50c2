"""Fixtures for the CSI node plugin: a real agent process serving the CSI socket as root,
kubelet's part played by :class:`tests.csi.kubelet.Kubelet` with real bind mounts under the
test's temporary directory, and a teardown that unmounts whatever is left there (also when
the test failed)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.csi import mounts
from tests.csi.kubelet import Kubelet
from tests.servers.agent import AgentProcess

#: an arbitrary uid, as OpenShift's restricted-v2 gives a pod
POD_UID = 1000680000


def mounts_under(root: Path) -> list[str]:
    prefix = os.fspath(root) + "/"
    return [m.mount_point for m in mounts.mount_table() if m.mount_point.startswith(prefix)]


@pytest.fixture(autouse=True)
def unmount_everything(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under its directory is unmounted at teardown, newest first."""
    yield
    for point in reversed(mounts_under(tmp_path)):
        mounts.unmount(Path(point))
    assert mounts_under(tmp_path) == []


@pytest.fixture
def kubelet_root(tmp_path: Path) -> Path:
    root = tmp_path / "var" / "lib" / "kubelet"
    (root / "pods").mkdir(parents=True)
    return root


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    """A directory ``file://`` models may come from (``--allow-path``)."""
    path = tmp_path / "seed"
    path.mkdir()
    return path


def csi_args(tmp_path: Path, kubelet_root: Path, wait: float = 1.0) -> list[str]:
    return ["--csi-endpoint", f"unix://{tmp_path}/plugin/csi.sock",
            "--csi-kubelet-dir", str(kubelet_root), "--csi-publish-wait", str(wait)]


@pytest.fixture
def csi_agent(tmp_path: Path, kubelet_root: Path, seed: Path) -> Iterator[AgentProcess]:
    """A standalone agent process with the CSI node service (publish wait 1 s)."""
    with AgentProcess(tmp_path / "store", allow_paths=[seed], log_dir=tmp_path / "logs",
                      extra_args=csi_args(tmp_path, kubelet_root)) as agent:
        yield agent


@pytest.fixture
async def kubelet(tmp_path: Path, kubelet_root: Path) -> AsyncIterator[Kubelet]:
    async with Kubelet(tmp_path / "plugin" / "csi.sock", kubelet_root) as k:
        yield k


def write_model(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root

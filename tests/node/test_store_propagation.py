"""The agent's store mount and mount propagation, for real: a disk mounted at the store path
on the node after the agent started must be the agent's store too, as it is the pods'
(their hostPaths are bound when they start). What the container runtime does with the
DaemonSet's ``mountPropagation`` is emulated with mount namespaces: the node's namespace
(a private copy of this machine's, its root made shared as systemd makes a node's), and the
agent container's, a slave of it (``HostToContainer``) or private (no propagation)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy import render
from tests.deploy.render import find

pytestmark = pytest.mark.slow

PROPAGATION = {"HostToContainer": "slave", "Bidirectional": "shared", None: "private"}
_SCRIPT = r"""
set -e
store="$1"; propagation="$2"; shift 2
mount --make-rshared /
mkdir -p "$store"
# the agent's container: its own mount namespace, started before the disk is mounted
unshare --mount --propagation "$propagation" sh -c \
  'echo started > "$1.started"; while [ ! -e "$1.mounted" ]; do sleep 0.05; done;
   if mountpoint -q "$1"; then echo seen; else echo unseen; fi' sh "$store" > "$store.seen" &
while [ ! -e "$store.started" ]; do sleep 0.05; done
mount -t tmpfs -o size=8m tmpfs "$store"   # the node's disk arrives
touch "$store.mounted"
wait
cat "$store.seen"
"""


def test_a_disk_mounted_after_the_agent_started_is_its_store(tmp_path: Path) -> None:
    spec = find(render.render("self-signed"), "DaemonSet", "modelcache-agent")["spec"][
        "template"]["spec"]
    (agent,) = [c for c in spec["containers"] if c["name"] == "agent"]
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == "/var/lib/modelcache"]
    propagation = PROPAGATION[mount.get("mountPropagation")]
    # everything in a namespace of its own: nothing of this machine's mounts is changed
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, "sh",
         str(tmp_path / "store"), propagation],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["seen"], f"propagation {propagation}: the agent does not " \
        "see the disk mounted at its store path"
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()

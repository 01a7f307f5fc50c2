"""kubelet's part of a hostPath volume and the container runtime's bind mount, for real.

kubelet, for a pod's ``hostPath`` volume (``pkg/volume/hostpath``): with type
``DirectoryOrCreate`` it makes a missing directory as root:root 0755, parents included; with
type ``Directory`` it only checks that one is there, and while it is not the volume's set-up
fails and is retried with exponential backoff (the pod waits, with ``FailedMount`` events).
Then the runtime bind-mounts the directory into the container's own mount namespace before
any init container runs: the container sees that very inode from then on, whatever is
renamed over it on the host.

:func:`set_up` is kubelet's part (run as root, as kubelet is); :func:`run_init_in_pod` builds
the pod's mount namespace (``unshare --mount --propagation private``): a tmpfs as its root
for the emptyDir and the token, the hostPath bound read-only at the side path, and runs the
init container's command in it as an arbitrary non-root uid without capabilities. The
namespace, and every mount in it, ends with the command.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.servers.agent import REPO, unprivileged

POD_UID = 1000680000  # OpenShift restricted-v2 style: an arbitrary uid of the namespace's range
RETRY_BASE, RETRY_MAX = 0.05, 1.0


class MountFailed(Exception):
    """kubelet's volume set-up kept failing (its FailedMount event)."""


async def set_up(volume: dict[str, Any], deadline: float = 15.0) -> list[str]:
    """kubelet's set-up of a ``hostPath`` volume; the FailedMount messages before it
    succeeded."""
    path, kind = Path(volume["hostPath"]["path"]), volume["hostPath"].get("type", "")
    failures: list[str] = []
    delay, started = RETRY_BASE, time.monotonic()
    while True:
        if kind == "DirectoryOrCreate" and not path.exists():
            _make_as_kubelet(path)
        if path.is_dir():
            return failures
        if kind not in ("Directory", "DirectoryOrCreate"):
            raise AssertionError(f"hostPath type {kind!r} is not emulated here")
        failures.append(f"MountVolume.SetUp failed: hostPath type check failed: {path} is "
                        "not a directory")
        if time.monotonic() - started > deadline:
            raise MountFailed(failures[-1])
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


def _make_as_kubelet(path: Path) -> None:
    """``os.MkdirAll(path, 0755)`` as root: every missing directory root:root 0755."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        os.mkdir(p)
        os.chown(p, 0, 0)
        os.chmod(p, 0o755)  # noqa: S103 - what kubelet does


_IN_POD = r"""
import hashlib, json, os, subprocess, sys
host, root, side, mount, token, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], \
    sys.argv[5], json.loads(sys.argv[6])
def run(*cmd):
    subprocess.run(cmd, check=True)
run("mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "tmpfs", root)
os.makedirs(side)
os.makedirs(mount)
os.chmod(mount, 0o1777)  # an emptyDir
with open(os.path.join(root, "token"), "w") as f:
    f.write(token)
os.chmod(os.path.join(root, "token"), 0o644)
run("mount", "--bind", host, side)
run("mount", "-o", "remount,bind,ro", side)
out = {"before": sorted(os.listdir(side)), "side_inode": os.stat(side).st_ino,
       "side_dev": os.stat(side).st_dev}
init = subprocess.run(argv, capture_output=True, text=True, timeout=120)
out.update(code=init.returncode, stderr=init.stderr[-3000:], files={}, links={})
for dirpath, _, names in os.walk(mount):
    for name in names:
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, mount)
        if rel.startswith(".modelcache"):
            continue
        out["links"][rel] = os.readlink(path) if os.path.islink(path) else None
        with open(path, "rb") as f:
            out["files"][rel] = hashlib.sha256(f.read()).hexdigest()
out["after"] = sorted(os.listdir(side))
print(json.dumps(out))
"""


async def run_init_in_pod(host_path: Path, command: list[str], token: str, scratch: Path,
                          env: dict[str, str], uid: int = POD_UID) -> dict[str, Any]:
    """Run the init container's ``command`` (``modelcache init ...`` as the webhook wrote it,
    its ``--side-path``, ``--mount-path`` and ``--token-file`` moved into the pod's own
    tmpfs under ``scratch``) in a pod mount namespace where ``host_path`` is bound read-only
    at the side path; what the pod saw (see ``_IN_POD``)."""
    root = scratch
    side, mount, token_file = root / "side", root / "models", root / "token"
    argv = _moved(command, {"--side-path": side, "--mount-path": mount,
                            "--token-file": token_file})
    argv = [*unprivileged(uid), sys.executable, "-m", "agent", *argv[1:]]
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", sys.executable, "-c", _IN_POD,
        str(host_path), str(root), str(side), str(mount), token, json.dumps(argv),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _moved(command: list[str], paths: dict[str, Path]) -> list[str]:
    out = list(command)
    for flag, path in paths.items():
        out[out.index(flag) + 1] = str(path)
    return out

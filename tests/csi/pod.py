"""A container's view of a published volume: bind-mounted into a private mount namespace, as
a container runtime does, and read by a process with an arbitrary uid and no capabilities
(OpenShift's restricted-v2 gives pods such a uid)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

UID = 1000680000
MOUNT_PATH = "/mnt/models"
_READER = r"""
import errno, hashlib, json, os, sys
root = sys.argv[1]
out = {"uid": os.getuid(), "files": {}}
for dirpath, dirs, files in os.walk(root):
    for name in files:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
            out["files"][os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
def attempt(what, fn):
    try:
        fn()
        out[what] = "ok"
    except OSError as e:
        out[what] = errno.errorcode[e.errno]
attempt("create", lambda: open(os.path.join(root, "new-file"), "xb"))
first = sorted(out["files"])[0]
attempt("overwrite", lambda: open(os.path.join(root, first), "r+b"))
attempt("mkdir", lambda: os.mkdir(os.path.join(root, "new-dir")))
print(json.dumps(out))
"""


def read_as_pod(target: Path, uid: int = UID) -> dict[str, Any]:
    """Every file's sha256 as the pod's process sees it, and what its writes get (errno
    names: ``EROFS``...)."""
    script = (f"mount -t tmpfs tmpfs /mnt && mkdir {MOUNT_PATH} && "
              f'mount --bind "$0" {MOUNT_PATH} && exec setpriv --reuid {uid} --regid {uid} '
              '--clear-groups --inh-caps=-all --bounding-set=-all "$@"')
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(target),
         sys.executable, "-c", _READER, MOUNT_PATH],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result

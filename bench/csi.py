"""Handing a warm model to a pod: the CSI mode's publish against the cache mode's init container.

One standalone agent process (as root, serving the CSI node service) with a model already
ready in its store, then ``--reps`` rounds, the two paths interleaved:

- ``csi``: kubelet's NodePublishVolume over the plugin's unix socket (the kubelet emulator of
  ``tests/csi``), timed from the call to a readable mount: the call returns and the first
  byte of every file is read through the mount. Unpublished after each rep (not timed).
- ``init``: the cache mode's injected init container on a warm node, ``modelcache init
  --mode cache`` as a process with the model's store directory as its side path (what the
  hostPath gives it), timed from the process's start to the first byte of every file read
  through the links it made in the (emptyDir) mount path: what a pod waits before its
  containers start.

Prints the medians, the 90th percentiles and the ratio. Not a test: run it by hand, as root
(real bind mounts), from the repository; it needs no extra beyond the base install (grpcio
is a dependency of the agent; the helpers it shares with the tests are in ``tests/``).

    sudo .venv/bin/python bench/csi.py [--reps 50] [--files 4] [--file-mib 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.csi import mounts  # noqa: E402 - after the path is set
from agent.csi.proto import csi_pb2 as pb  # noqa: E402
from tests.csi.kubelet import Kubelet, Pod  # noqa: E402
from tests.servers.agent import AgentProcess  # noqa: E402


def make_model(root: Path, files: int, file_mib: int) -> list[str]:
    root.mkdir(parents=True)
    names = ["config.json"] + [f"model-{i:05d}-of-{files:05d}.safetensors"
                               for i in range(1, files + 1)]
    (root / names[0]).write_text('{"model_type": "bench"}')
    for name in names[1:]:
        (root / name).write_bytes(os.urandom(file_mib * 1024 * 1024))
    return names


def first_bytes(directory: Path, names: list[str]) -> None:
    for name in names:
        with (directory / name).open("rb") as f:
            if not f.read(1):
                raise RuntimeError(f"{name} is empty through {directory}")


async def csi_rep(kubelet: Kubelet, uri: str, names: list[str]) -> float:
    pod = Pod(uid=str(uuid.uuid4()))
    kubelet.volume_dir(pod, "model").mkdir(parents=True)
    request = kubelet.publish_request(pod, "model", {"model": uri})
    started = time.perf_counter()
    await kubelet.publish_once(request)
    first_bytes(kubelet.target(pod, "model"), names)
    seconds = time.perf_counter() - started
    await kubelet.node_call("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(
        volume_id=request.volume_id, target_path=request.target_path))
    return seconds


def init_rep(agent: AgentProcess, uri: str, key: str, names: list[str], work: Path) -> float:
    mount = work / f"mount-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    argv = [sys.executable, "-m", "agent", "init", "--uri", uri, "--mount-path", str(mount),
            "--side-path", str(agent.store / "models" / key), "--agent-url", agent.url,
            "--token-file", str(agent.store / "admin-token"), "--mode", "cache",
            "--log-level", "warning"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"modelcache init failed: {proc.stderr}")
    first_bytes(mount, names)
    return time.perf_counter() - started


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * len(ordered)) - 1)]


async def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench/csi.py makes real bind mounts: run it as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="modelcache-bench-csi-") as tmp:
        work = Path(tmp)
        kubelet_root = work / "kubelet"
        (kubelet_root / "pods").mkdir(parents=True)
        names = make_model(work / "seed" / "model", args.files, args.file_mib)
        uri = f"file://{work / 'seed' / 'model'}"
        agent = AgentProcess(work / "store", allow_paths=[work / "seed"], log_dir=work / "logs",
                             extra_args=["--csi-endpoint", f"unix://{work}/plugin/csi.sock",
                                         "--csi-kubelet-dir", str(kubelet_root),
                                         "--log-level", "warning"])
        try:
            agent.start()
            key = str(agent.ensure(uri)["key"])
            assert agent.wait_ready(key, 60)["state"] == "ready"
            results: dict[str, list[float]] = {"csi": [], "init": []}
            async with Kubelet(work / "plugin" / "csi.sock", kubelet_root) as kubelet:
                await csi_rep(kubelet, uri, names)  # warm-up of both paths (not counted)
                init_rep(agent, uri, key, names, work)
                for rep in range(args.reps):
                    order = ("csi", "init") if rep % 2 == 0 else ("init", "csi")
                    for path in order:
                        seconds = await csi_rep(kubelet, uri, names) if path == "csi" \
                            else await asyncio.to_thread(init_rep, agent, uri, key, names, work)
                        results[path].append(seconds)
        finally:
            agent.stop()
            for m in reversed(mounts.mount_table()):
                if m.mount_point.startswith(str(work) + "/"):
                    mounts.unmount(Path(m.mount_point))
    size = args.files * args.file_mib
    print(f"warm model: {args.files} x {args.file_mib} MiB + config.json ({size} MiB), "
          f"{args.reps} reps each, interleaved")
    for path, what in (("csi", "NodePublishVolume -> readable mount"),
                       ("init", "modelcache init (cache mode) -> readable links")):
        values = results[path]
        print(f"  {path:5} {what:48} median {statistics.median(values) * 1000:8.1f} ms   "
              f"p90 {p90(values) * 1000:8.1f} ms")
    ratio = statistics.median(results["init"]) / statistics.median(results["csi"])
    print(f"  the init container path takes {ratio:.1f}x the CSI publish (medians)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--file-mib", type=int, default=16)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

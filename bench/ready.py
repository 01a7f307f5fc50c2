"""Time to ready: a safetensors model loaded into CPU memory from a real agent's published
tree, with the page cache dropped against after the agent's page-cache warming, beside the
disk's own sequential read rate; and the init container's warm path.

Needs root (``/proc/sys/vm/drop_caches``) and the bench extra (``pip install -e
'.[bench]'``: ``safetensors`` and ``numpy``, the loader a serving process uses). Not a test:
run it by hand on an otherwise quiet machine (it prints ``uptime`` before and after).

1. A model of ``--size-gib`` GiB in two safetensors shards written by the ``safetensors``
   library itself (real headers: float16 tensors of random bits), with the
   ``model.safetensors.index.json`` and ``config.json`` a Hugging Face model has.
2. A real agent process (``python -m agent agent --standalone``, default page-cache
   settings) pulls it from ``file://`` and publishes its tree.
3. ``--reps`` reps, the order of the rows rotated each rep (interleaved):

   - ``disk``: ``dd iflag=direct bs=16M`` of the largest shard (the device, no cache);
   - ``cold``: ``echo 3 > /proc/sys/vm/drop_caches``, then a fresh process loads every shard
     into CPU memory as transformers and vLLM do (``safetensors.safe_open``, ``get_tensor``
     of each tensor; timed inside it, imports excluded);
   - ``warmed``: drop the caches, ask the agent to ensure the model (what the init container
     does; it starts the warming), wait until the agent's metrics say the warming ended
     (``warm`` is that time), then the same load;
   - ``race``: drop the caches, run the init container (``python -m agent init``: its ensure
     starts the warming) and the load right after it, with no image pull between them:
     pod-to-loaded in the worst case for warming (``race`` is init + load).

4. The init container's warm path (``python -m agent init`` of a ready model, process start
   to exit) ``--init-reps`` times, and ``-X importtime`` of it (the sum of its top-level
   imports, best of 5); with ``--baseline DIR`` (another checkout, e.g. ``git archive main``
   unpacked) the same of that checkout's init container, interleaved.

Prints each rep, then the medians and ratios.

    sudo python bench/ready.py [--reps 5] [--init-reps 20] [--size-gib 2] [--dir DIR]
                               [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
TENSOR_BYTES = 128 * MiB
ROWS = ("disk", "cold", "warmed", "race")
#: what transformers and vLLM do: safe_open each shard, every tensor copied out of it
LOADER = """
import json, sys, time
from safetensors import safe_open
started = time.perf_counter()
n = 0
for path in sys.argv[1:]:
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            n += f.get_tensor(name).nbytes
print(json.dumps({"seconds": time.perf_counter() - started, "bytes": n}))
"""


def make_model(d: Path, total: int) -> list[str]:
    """Two shards of float16 tensors (random bits) and the index that names them."""
    import numpy as np
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    tensors = max(2, total // TENSOR_BYTES)
    shards = [list(range(0, tensors // 2)), list(range(tensors // 2, tensors))]
    names, weight_map = [], {}
    for i, members in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path = d / name
        if not path.exists():
            side = int((TENSOR_BYTES // 2) ** 0.5)
            save_file({f"model.layers.{t}.weight": np.frombuffer(
                os.urandom(side * side * 2), dtype=np.float16).reshape(side, side)
                for t in members}, str(path), metadata={"format": "np"})
        names.append(name)
        weight_map.update({f"model.layers.{t}.weight": name for t in members})
    size = sum((d / n).stat().st_size for n in names)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"architectures": ["Bench"], "torch_dtype":
                                               "float16", "num_hidden_layers": tensors}))
    return names


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class Agent:
    """A real agent process on a free loopback port."""

    def __init__(self, base: Path, src: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.store = base / "store"
        shutil.rmtree(self.store, ignore_errors=True)
        self.log = (base / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(self.store),
             "--listen", f"127.0.0.1:{self.port}", "--allow-path", str(src),
             "--log-level", "info"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.get("/readyz").status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the agent did not start (see agent.log)")
            time.sleep(0.05)
        self.token = (self.store / "admin-token").read_text().strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        return urllib.request.urlopen(self.url + path, timeout=600)  # noqa: S310 (loopback)

    def ensure(self, uri: str) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (loopback)
            self.url + "/api/v1/models", data=json.dumps({"uri": uri}).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token}"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310 (loopback)
            return dict(json.loads(r.read()))

    def wait_ready(self, key: str) -> dict[str, Any]:
        with self.get(f"/api/v1/models/{key}?wait=600") as r:
            return dict(json.loads(r.read()))

    def warmings_ended(self) -> float:
        """Warmings that ran to the end plus those skipped or stopped (the agent's metrics)."""
        with self.get("/metrics") as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(
            r"^modelcache_pagecache_warmings_(?:skipped_)?total(?:\{[^}]*\})? (\S+)$",
            text, re.M))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def load(paths: list[Path]) -> float:
    out = subprocess.run([sys.executable, "-c", LOADER, *map(str, paths)], check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out)["seconds"])


def dd_rate(path: Path) -> float:
    """MB/s of dd reading ``path`` with O_DIRECT, 16 MiB blocks."""
    err = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                         check=True, capture_output=True, text=True).stderr
    copied = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", err, re.M)
    assert copied, err
    return int(copied[1]) / float(copied[2]) / 1e6


def init_argv(agent: Agent, uri: str, key: str, mount: Path, *flags: str) -> list[str]:
    return [sys.executable, *flags, "-m", "agent", "init", "--uri", uri,
            "--mount-path", str(mount), "--side-path", str(agent.store / "models" / key),
            "--agent-url", agent.url, "--token-file", str(agent.store / "admin-token"),
            "--log-level", "warning"]


def run_init(argv: list[str], code: Path = ROOT) -> float:
    """Process start to exit of an init container run from the checkout ``code``."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def import_ms(argv: list[str], code: Path, tries: int = 5) -> tuple[float, list[str]]:
    """``-X importtime`` of the init container: the sum of its top-level imports (ms, best
    of ``tries``) and the three that cost most."""
    best: tuple[float, list[str]] = (float("inf"), [])
    for _ in range(tries):
        err = subprocess.run([*argv[:1], "-X", "importtime", *argv[1:]], cwd=code,
                             env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True,
                             text=True, check=True).stderr
        top = [(int(m[1]), m[2]) for m in re.finditer(
            r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", err, re.M)]
        total = sum(us for us, _ in top) / 1000
        if total < best[0]:
            best = (total, [f"{name} {us / 1000:.0f} ms" for us, name in
                            sorted(top, reverse=True)[:3]])
    return best


def settle(agent: Agent, before: float) -> None:
    """Wait until the agent has ended a warming since it said ``before``."""
    while agent.warmings_ended() <= before:
        time.sleep(0.05)


def warm(agent: Agent, uri: str) -> float:
    """Ensure (which starts a warming) and wait until the agent says it ended."""
    before = agent.warmings_ended()
    started = time.perf_counter()
    agent.ensure(uri)
    settle(agent, before)
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--init-reps", type=int, default=20)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "modelcache-ready"))
    p.add_argument("--baseline", type=Path, help="another checkout whose init container's "
                   "warm path is timed beside this one's")
    args = p.parse_args()
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("needs root: writes /proc/sys/vm/drop_caches", file=sys.stderr)
        return 2
    base = Path(args.dir)
    src = base / "src" / "model"
    names = make_model(src, int(args.size_gib * 1024 * MiB))
    uri = f"file://{src}"
    print(f"before: {uptime()}")
    agent = Agent(base, base / "src")
    try:
        model = agent.wait_ready(agent.ensure(uri)["key"])
        assert model["state"] == "ready", model
        settle(agent, 0)  # the pull's own ensure warmed (or found resident) what it wrote
        key = model["key"]
        manifest = json.loads((agent.store / "models" / key / "manifest.json").read_text())
        tree = agent.store / "models" / key / manifest["tree"]
        shards = [tree / n for n in names]
        size = sum(s.stat().st_size for s in shards)
        print(f"model: {len(shards)} shards, {size / 2**30:.2f} GiB, published at {tree}")
        mount = base / "pod" / "models"
        times: dict[str, list[float]] = {r: [] for r in (*ROWS, "warm")}
        for rep in range(args.reps):
            order = ROWS[rep % len(ROWS):] + ROWS[:rep % len(ROWS)]
            line = []
            for row in order:
                if row == "disk":
                    times["disk"].append(dd_rate(max(shards, key=lambda s: s.stat().st_size)))
                    line.append(f"disk {times['disk'][-1]:.0f} MB/s")
                    continue
                drop_caches()
                if row == "cold":
                    times["cold"].append(load(shards))
                elif row == "warmed":
                    times["warm"].append(warm(agent, uri))
                    times["warmed"].append(load(shards))
                else:  # race: the init container, then the loader at once
                    before = agent.warmings_ended()
                    started = time.perf_counter()
                    run_init(init_argv(agent, uri, key, mount))
                    load([mount / n for n in names])
                    times["race"].append(time.perf_counter() - started)
                    settle(agent, before)  # the warming the init container started
                line.append(f"{row} {times[row][-1]:.2f} s")
            print(f"rep {rep + 1}: " + ", ".join(line), flush=True)

        codes = {"this": ROOT, **({"baseline": args.baseline} if args.baseline else {})}
        init: dict[str, list[float]] = {name: [] for name in codes}
        for _ in range(args.init_reps):
            for name, code in codes.items():
                init[name].append(run_init(init_argv(agent, uri, key, mount), code))
        imports = {name: import_ms(init_argv(agent, uri, key, mount), code)
                   for name, code in codes.items()}
    finally:
        agent.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    gib = size / 2**30
    print(f"\nafter: {uptime()}")
    print(f"medians of {args.reps} reps ({gib:.2f} GiB):")
    print(f"  disk (dd iflag=direct)   {med['disk']:8.0f} MB/s  "
          f"= {size / med['disk'] / 1e6:.2f} s for the model")
    print(f"  load, page cache dropped {med['cold']:8.2f} s  ({size / med['cold'] / 1e6:.0f} MB/s)")
    print(f"  warming (ensure -> done) {med['warm']:8.2f} s  ({size / med['warm'] / 1e6:.0f} MB/s)")
    print(f"  load, after the warming  {med['warmed']:8.2f} s  "
          f"({size / med['warmed'] / 1e6:.0f} MB/s)")
    print(f"  cold / warmed            {med['cold'] / med['warmed']:8.2f}x")
    print(f"  race: init + load        {med['race']:8.2f} s  (no image pull between them)")
    for name, runs in init.items():
        total, top = imports[name]
        print(f"init container warm path ({name}), median of {len(runs)}: "
              f"{statistics.median(runs) * 1000:.0f} ms (min {min(runs) * 1000:.0f}, "
              f"max {max(runs) * 1000:.0f}); imports {total:.0f} ms: {', '.join(top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

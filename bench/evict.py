"""Eviction at scale: choosing and evicting victims among 5k models and 100k blobs, while
the admin API keeps answering.

A store is seeded on a tmpfs (root only) with ``--models`` models of ``--files`` blobs of
4 KiB each, plus a hundred blobs shared by groups of models, and the tmpfs is resized so
that the store fills it just under the default high watermark (80%). A real agent process
runs on it (``modelcache agent --standalone``) while the bench sends ``GET /healthz`` open
loop (``--rate`` per second, latency counted from each request's scheduled time). Then:

1. ``POST /api/v1/gc``: garbage collection (a full scan of the blob directory) and eviction
   down to the low watermark (70%);
2. a file of other data pushes the filesystem over the high watermark, and the agent's
   periodic check (every second here) evicts down to the low watermark again.

For each sweep: models evicted, wall time, the agent's CPU time (minus what the probe load
alone costs, measured before), and the probe latencies (p50, p99, max) during it.

    sudo python bench/evict.py [--models 5000] [--files 20] [--rate 200]

Not a CI test. Targets: under 1 s of CPU per sweep; p99 of ``GET /healthz`` under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.evict.seed import seed_store  # noqa: E402 - after the path is set

TOKEN = "bench-evict-token-0123456789"
TARGET_CPU_S = 1.0
TARGET_P99_MS = 50.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def used_ratio(path: Path) -> float:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) / st.f_blocks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Probe:
    """Open-loop ``GET /healthz``: (scheduled time, latency in seconds) of each request."""

    url: str
    rate: float
    results: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks: set[asyncio.Task[None]] = set()
            start = time.perf_counter()
            n = 0
            while not stop.is_set():
                due = start + n / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._one(session, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, due: float) -> None:
        try:
            async with session.get(self.url) as resp:
                await resp.read()
                ok = resp.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok:
            self.results.append((due, time.perf_counter() - due))
        else:
            self.errors += 1

    def window(self, start: float, end: float) -> list[float]:
        return [lat for due, lat in self.results if start <= due <= end]


def evictions_in(log: Path) -> int:
    return log.read_text(errors="replace").count('"msg": "evicted model"')


async def sweep(name: str, pid: int, probe: Probe, idle_cpu_rate: float, log: Path,
                trigger: object, done: object) -> dict[str, float]:
    before_evicted = evictions_in(log)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await trigger  # type: ignore[misc]
    await done  # type: ignore[misc]
    t1 = time.perf_counter()
    cpu = cpu_seconds(pid) - cpu0
    lat = probe.window(t0, t1)
    row = {
        "evicted": evictions_in(log) - before_evicted, "wall_s": t1 - t0,
        "cpu_s": cpu, "cpu_adj_s": max(0.0, cpu - idle_cpu_rate * (t1 - t0)),
        "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": max(lat) * 1e3, "probes": len(lat),
    }
    print(f"{name:22} evicted {row['evicted']:5.0f} models in {row['wall_s']:5.2f} s; agent CPU "
          f"{row['cpu_s']:.3f} s ({row['cpu_adj_s']:.3f} s without the probe load); healthz "
          f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms "
          f"over {row['probes']:.0f} probes")
    return row


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="modelcache-bench-evict-") as tmp:
        fs = Path(tmp) / "fs"
        fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(fs)], check=True)
        try:
            return await measure(args, fs, Path(tmp))
        finally:
            subprocess.run(["umount", str(fs)], check=False)


async def measure(args: argparse.Namespace, fs: Path, tmp: Path) -> int:
    store = fs / "store"
    t = time.perf_counter()
    seeded = seed_store(store, args.models, files=args.files, size=4096, shared_groups=100)
    st = os.statvfs(fs)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    size = int(used / 0.79) // 4096 * 4096
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)
    print(f"seeded {args.models} models, {seeded.blobs} blobs ({seeded.cache_bytes / 2**20:.0f} "
          f"MiB) in {time.perf_counter() - t:.1f} s; tmpfs {size / 2**20:.0f} MiB, "
          f"{used_ratio(fs):.1%} used")

    port = free_port()
    (tmp / "token").write_text(TOKEN)
    (tmp / "agent.yaml").write_text("store: {evictInterval: 1}\n")
    log = tmp / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(store),
             "--listen", f"127.0.0.1:{port}", "--token-file", str(tmp / "token"),
             "--config", str(tmp / "agent.yaml")],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    probe = Probe(base + "/healthz", args.rate)
    try:
        async with aiohttp.ClientSession() as session:
            await ready(session, base, proc)
            print(f"agent ready (pid {proc.pid}); probing /healthz at {args.rate:.0f}/s")
            probing = asyncio.create_task(probe.run(stop))
            await asyncio.sleep(1.0)
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            await asyncio.sleep(2.0)
            idle = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
            lat = probe.window(t0, time.perf_counter())
            print(f"{'idle under the probe':22} agent CPU {idle:.3f} s/s; healthz p50 "
                  f"{percentile(lat, 50) * 1e3:.1f} ms, p99 {percentile(lat, 99) * 1e3:.1f} ms")

            async def gc() -> None:
                async with session.post(base + "/api/v1/gc",
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    assert resp.status == 200, await resp.text()

            async def nothing() -> None:
                return None

            rows = [await sweep("POST /api/v1/gc", proc.pid, probe, idle, log, gc(), nothing())]
            print(f"{'':22} now {used_ratio(fs):.1%} used")

            async def fill() -> None:
                st = os.statvfs(fs)
                want = int(0.81 * st.f_blocks) - (st.f_blocks - st.f_bfree)
                await asyncio.to_thread(write_filler, fs / "filler", want * st.f_frsize)

            async def settled() -> None:
                while used_ratio(fs) > 0.7:
                    await asyncio.sleep(0.01)

            await asyncio.sleep(0.5)
            rows.append(await sweep("watermark check", proc.pid, probe, idle, log, fill(),
                                    settled()))
            print(f"{'':22} now {used_ratio(fs):.1%} used")
            await asyncio.sleep(0.5)
            stop.set()
            await probing
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    worst_cpu = max(r["cpu_adj_s"] for r in rows)
    worst_p99 = max(r["p99_ms"] for r in rows)
    print(f"\ntargets: CPU per sweep {worst_cpu:.3f} s [< {TARGET_CPU_S} s]; healthz p99 "
          f"{worst_p99:.1f} ms [< {TARGET_P99_MS} ms]; probe errors {probe.errors}")
    return 0 if worst_cpu < TARGET_CPU_S and worst_p99 < TARGET_P99_MS else 1


def write_filler(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        while nbytes > 0:
            f.write(chunk[:nbytes])
            nbytes -= len(chunk)


async def ready(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
                ) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the agent exited")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError("the agent did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=5000)
    p.add_argument("--files", type=int, default=20, help="blobs of its own per model")
    p.add_argument("--rate", type=float, default=200.0, help="GET /healthz per second")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/evict.py mounts a tmpfs: run it as root", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

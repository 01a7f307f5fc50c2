"""Pull throughput on loopback: the agent against curl and KServe's storage initializer.

Generates a model of N x SHARD random shards plus small JSON files, serves it from a local
nginx (sendfile, page cache warm), and runs, rep by rep with the order rotated each rep:

- ``curl-null``: curl of every file to /dev/null, one process (the loopback limit);
- ``curl-files``: the same into files (curl does not fsync);
- ``agent``: a real agent process pulls every file URI (one model per URI, all at once):
  download + blake3 + durable commit (fsync, rename, fsync dir), timed from the first POST
  to the last model ready; its CPU time and peak RSS are read from /proc;
- ``kserve``: ``kserve_storage.Storage.download`` of each HTTP URI, as the KServe storage
  initializer does (one URI per file, sequential).

Prints each rep, the medians and the ratios. Not a test: run it by hand.

    python bench/pull.py [--reps 5] [--shards 4] [--shard-mib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.client import AgentClient  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(d: Path, shards: int, shard_bytes: int) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        path = d / name
        if not path.exists() or path.stat().st_size != shard_bytes:
            with open(path, "wb") as f:
                left = shard_bytes
                while left:
                    n = min(left, 64 << 20)
                    f.write(os.urandom(n))
                    left -= n
        names.append(name)
    for name, body in (("config.json", {"hidden_size": 4096, "layers": 32}),
                       ("generation_config.json", {"temperature": 0.7}),
                       ("tokenizer_config.json", {"model_max_length": 8192})):
        (d / name).write_text(json.dumps(body))
        names.append(name)
    return names


def start_nginx(root: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        daemon off;
        worker_processes 1;
        pid {work}/nginx.pid;
        error_log {work}/error.log;
        events {{ worker_connections 256; }}
        http {{
          access_log off;
          client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
          fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
          types {{ }}
          default_type application/octet-stream;
          sendfile on; tcp_nopush on;
          keepalive_requests 10000;
          server {{ listen 127.0.0.1:{port}; root {root}; }}
        }}
    """))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    wait_port(port)
    return proc


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_curl(urls: list[str], out: Path | None) -> float:
    args = ["curl", "-sS", "--fail"]
    for url in urls:
        args += [url, "-o", str(out / url.rsplit("/", 1)[1]) if out else "/dev/null"]
    t = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t


def run_kserve(urls: list[str], out: Path) -> float:
    code = ("import sys\nfrom kserve_storage import Storage\n"
            "for u in sys.argv[2:]:\n    Storage.download(u, sys.argv[1])\n")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out), *urls], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


async def run_agent(agent_url: str, token: str, urls: list[str], pid: int
                    ) -> tuple[float, float]:
    async with AgentClient(agent_url, token) as client:
        cpu0 = cpu_seconds(pid)
        t = time.perf_counter()
        models = await asyncio.gather(*(client.ensure(u) for u in urls))
        results = await asyncio.gather(*(client.model(m["key"], wait=600) for m in models))
        elapsed = time.perf_counter() - t
        cpu = cpu_seconds(pid) - cpu0
        bad = [r for r in results if r["state"] != "ready"]
        if bad:
            raise RuntimeError(f"agent pull failed: {bad[0]['error']}")
        for m in results:
            await client.remove(m["key"])
        await client.gc()
    return elapsed, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mib", type=int, default=512)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "modelcache-bench"))
    p.add_argument("--skip-kserve", action="store_true")
    args = p.parse_args()

    base = Path(args.dir)
    model_dir = base / "model"
    names = make_model(model_dir, args.shards, args.shard_mib << 20)
    total = sum((model_dir / n).stat().st_size for n in names)
    port = free_port()
    nginx = start_nginx(model_dir, base / "nginx", port)
    urls = [f"http://127.0.0.1:{port}/{n}" for n in names]
    store = base / "store"
    shutil.rmtree(store, ignore_errors=True)
    agent_port = free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(store),
         "--listen", f"127.0.0.1:{agent_port}", "--allow-host", "127.0.0.1",
         "--log-level", "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_port(agent_port)
        token = (store / "admin-token").read_text().strip()
        agent_url = f"http://127.0.0.1:{agent_port}"
        for url in urls:  # warm nginx's page cache
            run_curl([url], None)
        contenders = ["curl-null", "curl-files", "agent"] + ([] if args.skip_kserve else
                                                              ["kserve"])
        times: dict[str, list[float]] = {c: [] for c in contenders}
        cpu: list[float] = []
        print(f"model: {len(names)} files, {total / 1e9:.2f} GB; nginx on 127.0.0.1:{port}; "
              f"{args.reps} reps, order rotated each rep")
        for rep in range(args.reps):
            order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
            row = []
            for c in order:
                out = base / f"out-{c}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if c == "curl-null":
                    t = run_curl(urls, None)
                elif c == "curl-files":
                    t = run_curl(urls, out)
                elif c == "kserve":
                    t = run_kserve(urls, out)
                else:
                    t, used = asyncio.run(run_agent(agent_url, token, urls, agent.pid))
                    cpu.append(used)
                shutil.rmtree(out, ignore_errors=True)
                times[c].append(t)
                row.append(f"{c} {t:6.3f}s {total / t / 1e9:5.2f} GB/s")
            print(f"rep {rep + 1}: " + " | ".join(row))
        med = {c: statistics.median(v) for c, v in times.items()}
        print("\nmedians:")
        for c, t in med.items():
            print(f"  {c:11} {t:7.3f} s  {total / t / 1e9:5.2f} GB/s  "
                  f"{med['curl-null'] / t:5.0%} of the loopback limit")
        cpu_per_gb = statistics.median(cpu) / (total / 1e9)
        rss = peak_rss_mib(agent.pid)
        print("\nratios (targets in brackets):")
        print(f"  agent / curl-null       {med['agent'] / med['curl-null']:5.2f}x  [<= 1.6x]")
        print(f"  curl-files / agent      {med['curl-files'] / med['agent']:5.2f}x  [> 1: faster]")
        if "kserve" in med:
            print(f"  kserve / agent          {med['kserve'] / med['agent']:5.2f}x  [>= 1.8x]")
        print(f"  agent CPU per GB        {cpu_per_gb:5.2f} s  [<= 1.2 s]")
        print(f"  agent peak RSS          {rss:5.0f} MiB  [<= 256 MiB]")
    finally:
        stop(agent)
        stop(nginx)
    return 0


if __name__ == "__main__":
    sys.exit(main())

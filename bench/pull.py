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

Then, the same model from each source against that source's own client, interleaved the same
way (a fresh agent process per source; its store emptied after every rep):

- ``hf``: the local Hugging Face hub (``tests/servers/hfhub.py``), LFS files redirected to
  nginx as its CDN; ``agent`` pulls ``hf://`` against ``snapshot_download`` of the real
  ``huggingface_hub`` (``HF_HUB_DISABLE_XET=1``, into a fresh cache, timed in its process);
- ``hf-cdn``: the same, with the CDN capping each connection (nginx ``limit_rate``,
  ``--cdn-mb-per-conn``, 40 MB/s by default: what one stream from Hugging Face's CDN gets,
  huggingface/huggingface_hub#2658), as a remote hub behaves; on bare loopback (``hf``) both
  sides are CPU-bound instead, and the agent's share goes to sha256 + blake3;
- ``oci``: the model pushed as an OCI artifact (one layer per file) to the Debian
  ``docker-registry``; ``agent`` pulls ``oci://`` against ``skopeo copy`` to an OCI layout;
- ``s3``: the model under a prefix of SeaweedFS (shards with ``x-amz-checksum-sha256``);
  ``agent`` pulls ``s3://`` (and verifies those checksums) against boto3's transfer manager
  downloading every object at once, as ``aws s3 cp --recursive`` does (timed in its process).

And the cost of a signature policy (``verify``): the model signed once with ``model_signing
sign key`` (sha256 over files, its default), pulled by one agent with ``"verify"`` and
without, alternated, from two sources: the hub (LFS: every sha256 stated by the source and
checked in the ingest's pass, so the check needs no read) and a tar of the model on nginx
(members have no stated digest: the check hashes each blob once more, off the event loop).

Prints each rep, the medians and the ratios. Not a test: run it by hand.

    python bench/pull.py [--reps 5] [--shards 4] [--shard-mib 512]
                         [--rows http,hf,hf-cdn,oci,s3,verify] [--cdn-mb-per-conn 40]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import mmap
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.client import AgentClient  # noqa: E402
from tests.servers.net import free_port, wait_until  # noqa: E402

SOURCE_ROWS = ("hf", "hf-cdn", "oci", "s3")

TICK = os.sysconf("SC_CLK_TCK")


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


def start_nginx(root: Path, work: Path, port: int, limit_rate: int = 0
                ) -> subprocess.Popen[bytes]:
    """nginx serving ``root``; ``limit_rate``: bytes per second per connection (0: none)."""
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
          limit_rate {limit_rate};
          server {{ listen 127.0.0.1:{port}; root {root}; }}
        }}
    """))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    wait_port(port)
    return proc


def wait_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0
    wait_until(listening, timeout=timeout, what=f"a listener on port {port}")


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


async def run_agent(agent_url: str, token: str, urls: list[str], pid: int,
                    verify: str | None = None) -> tuple[float, float]:
    async with AgentClient(agent_url, token) as client:
        cpu0 = cpu_seconds(pid)
        t = time.perf_counter()
        models = await asyncio.gather(*(client.ensure(u, verify=verify) for u in urls))
        results = await asyncio.gather(*(client.model(m["key"], wait=600) for m in models))
        elapsed = time.perf_counter() - t
        cpu = cpu_seconds(pid) - cpu0
        bad = [r for r in results if r["state"] != "ready"]
        if bad:
            raise RuntimeError(f"agent pull failed: {bad[0]['error']}")
        if verify and not all(r["verified"] for r in results):
            raise RuntimeError("a pull under a policy ended without a passing check")
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
    p.add_argument("--rows", default=",".join(("http", *SOURCE_ROWS, "verify")),
                   help="comma-separated sections to run: http, hf, hf-cdn, oci, s3, verify")
    p.add_argument("--cdn-mb-per-conn", type=float, default=40.0,
                   help="hf-cdn: the CDN's cap per connection, in MB/s")
    args = p.parse_args()
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}

    base = Path(args.dir)
    model_dir = base / "model"
    names = make_model(model_dir, args.shards, args.shard_mib << 20)
    if "http" in rows:
        bench_http(args, base, model_dir, names)
    for row in SOURCE_ROWS:
        if row in rows:
            bench_source(row, args, base, model_dir, names)
    if "verify" in rows:
        bench_verify(args, base, model_dir, names)
    return 0


def bench_http(args: argparse.Namespace, base: Path, model_dir: Path, names: list[str]) -> None:
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
                os.sync()  # untimed: no contender's write-back lands in another's time
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


# --- each source against its own client --------------------------------------------------

HF_PEER = r"""
import sys, time
from huggingface_hub import snapshot_download
t = time.perf_counter()
snapshot_download(repo_id=sys.argv[1], cache_dir=sys.argv[2])
print(time.perf_counter() - t)
"""

S3_PEER = r"""
import os, sys, time
import boto3
from botocore.config import Config
from boto3.s3.transfer import TransferConfig, create_transfer_manager
bucket, prefix, out = sys.argv[1:4]
client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                      config=Config(s3={"addressing_style": "path"}))
t = time.perf_counter()
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
keys = [o["Key"] for page in pages for o in page.get("Contents", ())]
with create_transfer_manager(client, TransferConfig()) as manager:
    futures = []
    for key in keys:
        path = os.path.join(out, key[len(prefix) + 1:])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        futures.append(manager.download(bucket, key, path))
    for f in futures:
        f.result()
print(time.perf_counter() - t)
"""


@dataclass
class Served:
    """A model served by one source, and how its own client downloads it."""

    uri: str
    agent_env: dict[str, str]
    peer_name: str
    peer: Callable[[Path], float]
    """Download everything into a directory; return the seconds it took."""
    target: str
    note: str = ""
    """Said under the row's heading (how the server was set up)."""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "AWS_")) and "proxy" not in k.lower()}
    return {**env, **extra}


def mapped(path: Path, stack: contextlib.ExitStack) -> Any:
    """A file's bytes without copying them into memory (small files are just read)."""
    if path.stat().st_size < 1 << 20:
        return path.read_bytes()
    with open(path, "rb") as f:  # the mapping keeps its own reference to the file
        return stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def serve_hf(stack: contextlib.ExitStack, args: argparse.Namespace, base: Path,
             model_dir: Path, names: list[str], cdn_limited: bool = False) -> Served:
    from tests.servers.aioserver import AppThread
    from tests.servers.hfhub import HubServer

    hub = HubServer(cdn=True)
    hub.create_repo("bench/model", gitattributes=False)
    hub.commit("bench/model", {n: mapped(model_dir / n, stack) for n in names})
    cdn = base / "hf-cdn"
    shutil.rmtree(cdn, ignore_errors=True)
    (cdn / "lfs").mkdir(parents=True)
    for f in hub.head("bench/model").files:
        if f.lfs:
            os.link(model_dir / f.path, cdn / "lfs" / f.sha256)
    port = free_port()
    rate = int(args.cdn_mb_per_conn * 1e6) if cdn_limited else 0
    stack.callback(stop, start_nginx(cdn, base / "nginx-cdn", port, limit_rate=rate))
    hub.base_url = stack.enter_context(AppThread(hub.make_app(), name="hf-hub")).url
    hub.cdn_url = f"http://127.0.0.1:{port}"  # the CDN: nginx serving lfs/<sha256>

    def peer(out: Path) -> float:
        env = clean_env(HF_ENDPOINT=hub.base_url, HF_HOME=str(out / "home"),
                        HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                        HF_HUB_DISABLE_PROGRESS_BARS="1")
        done = subprocess.run([sys.executable, "-c", HF_PEER, "bench/model", str(out / "c")],
                              env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    return Served("hf://bench/model@main", {"HF_ENDPOINT": hub.base_url},
                  "snapshot_download", peer, ">= 3x")


def serve_hf_cdn(stack: contextlib.ExitStack, args: argparse.Namespace, base: Path,
                 model_dir: Path, names: list[str]) -> Served:
    served = serve_hf(stack, args, base, model_dir, names, cdn_limited=True)
    served.note = f"the CDN caps each connection at {args.cdn_mb_per_conn:g} MB/s"
    return served


def serve_oci(stack: contextlib.ExitStack, args: argparse.Namespace, base: Path,
              model_dir: Path, names: list[str]) -> Served:
    from tests.servers import oci
    from tests.servers.registry import SKOPEO, registry_server, skopeo_copy

    shutil.rmtree(base / "registry", ignore_errors=True)
    registry = stack.enter_context(registry_server(base / "registry"))
    image = oci.artifact({n: mapped(model_dir / n, stack) for n in names})
    skopeo_copy(image, registry, "bench/model", "v1", base)

    def peer(out: Path) -> float:
        t = time.perf_counter()
        subprocess.run([SKOPEO, "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{registry.address}/bench/model:v1", f"oci:{out}/layout:v1"],
                       env={"HOME": str(out), "PATH": "/usr/bin:/bin"}, check=True)
        return time.perf_counter() - t

    return Served(registry.ref("bench/model", "v1"), {}, "skopeo-copy", peer, "> 1: faster")


def serve_s3(stack: contextlib.ExitStack, args: argparse.Namespace, base: Path,
             model_dir: Path, names: list[str]) -> Served:
    from tests.servers.s3 import seaweedfs_server

    shutil.rmtree(base / "seaweedfs", ignore_errors=True)
    endpoint = stack.enter_context(seaweedfs_server(base / "seaweedfs"))
    client = endpoint.client()
    for n in names:
        digest = hashlib.sha256()
        with open(model_dir / n, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
            f.seek(0)
            client.put_object(Bucket=endpoint.bucket, Key=f"bench/{n}", Body=f,
                              ChecksumSHA256=base64.b64encode(digest.digest()).decode())

    def peer(out: Path) -> float:
        done = subprocess.run([sys.executable, "-c", S3_PEER, endpoint.bucket, "bench", str(out)],
                              env=clean_env(**endpoint.env()), capture_output=True, text=True,
                              check=True)
        return float(done.stdout.split()[-1])

    return Served(f"s3://{endpoint.bucket}/bench", endpoint.env(), "boto3-transfer", peer,
                  "> 1: faster, while verifying")


SERVERS: dict[str, Callable[[contextlib.ExitStack, argparse.Namespace, Path, Path, list[str]],
                            Served]] = {
    "hf": serve_hf, "hf-cdn": serve_hf_cdn, "oci": serve_oci, "s3": serve_s3,
}


def start_agent(store: Path, env: dict[str, str], *extra: str
                ) -> tuple[subprocess.Popen[bytes], str, str]:
    shutil.rmtree(store, ignore_errors=True)
    port = free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "agent", "--standalone", "--store", str(store),
         "--listen", f"127.0.0.1:{port}", "--allow-host", "127.0.0.1", "--log-level", "warning",
         *extra], cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT), **env))
    try:
        wait_port(port)
    except BaseException:
        stop(agent)
        raise
    return agent, f"http://127.0.0.1:{port}", (store / "admin-token").read_text().strip()


def bench_source(row: str, args: argparse.Namespace, base: Path, model_dir: Path,
                 names: list[str]) -> None:
    total = sum((model_dir / n).stat().st_size for n in names)
    with contextlib.ExitStack() as stack:
        served = SERVERS[row](stack, args, base, model_dir, names)
        agent, url, token = start_agent(base / f"store-{row}", served.agent_env)
        stack.callback(stop, agent)
        cpu: list[float] = []

        def pull(out: Path) -> float:
            elapsed, used = asyncio.run(run_agent(url, token, [served.uri], agent.pid))
            cpu.append(used)
            return elapsed

        contenders = {"agent": pull, served.peer_name: served.peer}
        out = base / f"out-{row}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        served.peer(out)  # warm the server's page cache (untimed)
        shutil.rmtree(out)
        print(f"\n{row}: {served.uri} ({len(names)} files, {total / 1e9:.2f} GB); "
              f"{args.reps} reps, order alternated each rep")
        if served.note:
            print(f"  ({served.note})")
        times: dict[str, list[float]] = {c: [] for c in contenders}
        for rep in range(args.reps):
            order = list(contenders)[rep % 2:] + list(contenders)[:rep % 2]
            line = []
            for c in order:
                (out / c).mkdir(parents=True)
                t = contenders[c](out / c)
                shutil.rmtree(out / c)
                os.sync()  # untimed: no contender's write-back lands in another's time
                times[c].append(t)
                line.append(f"{c} {t:6.3f}s {total / t / 1e9:5.2f} GB/s")
            print(f"rep {rep + 1}: " + " | ".join(line))
        med = {c: statistics.median(v) for c, v in times.items()}
        for c, t in med.items():
            print(f"  median {c:17} {t:7.3f} s  {total / t / 1e9:5.2f} GB/s")
        ratio = med[served.peer_name] / med["agent"]
        print(f"  {served.peer_name} / agent {ratio:8.2f}x  [{served.target}]")
        print(f"  agent CPU per GB {statistics.median(cpu) / (total / 1e9):11.2f} s")



# --- a signature policy's cost -------------------------------------------------------------


def sign_model(base: Path, model_dir: Path, names: list[str]) -> tuple[Path, Path]:
    """Sign the model (untimed) as its owner would; return the signature and public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    work = base / "verify"
    shutil.rmtree(work, ignore_errors=True)
    signed = work / "model"
    signed.mkdir(parents=True)
    for n in names:
        os.link(model_dir / n, signed / n)
    key = ec.generate_private_key(ec.SECP256R1())
    (work / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (work / "k.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    subprocess.run([str(Path(sys.executable).parent / "model_signing"), "sign", "key",
                    str(signed), "--private_key", str(work / "k.pem"),
                    "--signature", str(signed / "model.sig")], check=True,
                   capture_output=True)
    return signed / "model.sig", work / "k.pub"


def bench_verify(args: argparse.Namespace, base: Path, model_dir: Path,
                 names: list[str]) -> None:
    import tarfile

    from tests.servers.aioserver import AppThread
    from tests.servers.hfhub import HubServer

    total = sum((model_dir / n).stat().st_size for n in names)
    signature, public_key = sign_model(base, model_dir, names)
    config = base / "verify" / "agent.yaml"
    config.write_text(f"verifyPolicies: {{bench: {{publicKey: {public_key}}}}}\n")
    with contextlib.ExitStack() as stack:
        hub = HubServer()
        hub.create_repo("bench/signed", gitattributes=False)
        hub.commit("bench/signed", {**{n: mapped(model_dir / n, stack) for n in names},
                                    "model.sig": signature.read_bytes()},
                   lfs=[n for n in names if n.endswith(".safetensors")])
        hub.base_url = stack.enter_context(AppThread(hub.make_app(), name="hf-hub")).url
        www = base / "verify" / "www"
        www.mkdir()
        with tarfile.open(www / "model.tar", "w") as tar:
            for path in (*(model_dir / n for n in names), signature):
                tar.add(path, arcname=path.name)
        port = free_port()
        stack.callback(stop, start_nginx(www, base / "verify" / "nginx", port))
        agent, url, token = start_agent(base / "store-verify", {"HF_ENDPOINT": hub.base_url},
                                        "--config", str(config))
        stack.callback(stop, agent)
        for source, uri in (("hf (LFS sha256 stated)", "hf://bench/signed"),
                            ("nginx tar (no digest stated)", f"http://127.0.0.1:{port}/model.tar")):
            times: dict[str, list[float]] = {"plain": [], "verified": []}
            cpu: dict[str, list[float]] = {"plain": [], "verified": []}
            asyncio.run(run_agent(url, token, [uri], agent.pid))  # warm the page cache
            print(f"\nverify, {source}: {uri} ({len(names) + 1} files, {total / 1e9:.2f} GB); "
                  f"{args.reps} reps, order alternated each rep")
            for rep in range(args.reps):
                order = ["plain", "verified"][rep % 2:] + ["plain", "verified"][:rep % 2]
                line = []
                for c in order:
                    t, used = asyncio.run(run_agent(url, token, [uri], agent.pid,
                                                    "bench" if c == "verified" else None))
                    os.sync()
                    times[c].append(t)
                    cpu[c].append(used)
                    line.append(f"{c} {t:6.3f}s cpu {used:6.2f}s")
                print(f"rep {rep + 1}: " + " | ".join(line))
            med = {c: statistics.median(v) for c, v in times.items()}
            med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
            for c in med:
                print(f"  median {c:9} {med[c]:7.3f} s  {total / med[c] / 1e9:5.2f} GB/s  "
                      f"CPU {med_cpu[c]:6.2f} s ({med_cpu[c] / (total / 1e9):4.2f} s/GB)")
            print(f"  verified / plain: time {med['verified'] / med['plain']:5.2f}x, "
                  f"CPU {med_cpu['verified'] / med_cpu['plain']:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())

"""Admission latency of a real ``modelcache webhook`` process over loopback TLS.

Open loop: requests are sent on a fixed schedule (``--rate`` per second for
``--duration`` seconds, after a short warm-up) whatever the answers do, so a slow answer
cannot slow the arrivals (no coordinated omission). Latency is counted from each request's
*scheduled* time to its complete answer. The review is a realistic defaulted pod (the
``cache-defaults`` golden case) that gets mutated, each with its own UID; the client
connects as kube-apiserver does: TLS to the Service name, keep-alive connections.

    python bench/admission.py [--rate 200] [--duration 60]

Not a CI test. Target: p99 under 10 ms. For scale, Kyverno's published load test reports
an average of 42.67 ms per admission at 100 virtual users (their hardware and policies,
not measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webhook import certs  # noqa: E402 - after the path is set

SERVICE, NAMESPACE = "modelcache-webhook", "modelcache"
SERVER_NAME = f"{SERVICE}.{NAMESPACE}.svc"
KYVERNO_AVG_MS = 42.67
TARGET_P99_MS = 10.0
GOLDEN = ROOT / "tests" / "webhook" / "golden" / "cache-defaults.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def run(rate: float, duration: float, warmup: float) -> int:
    with tempfile.TemporaryDirectory(prefix="modelcache-bench-") as tmp:
        workdir = Path(tmp)
        minted = certs.mint(SERVICE, NAMESPACE)
        paths = certs.write(minted, workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(PYTHONPATH=str(ROOT), KUBECONFIG=str(workdir / "no-kubeconfig"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "webhook", "--listen", "127.0.0.1:0",
            "--tls-cert", str(paths["tls.crt"]), "--tls-key", str(paths["tls.key"]),
            "--shutdown-delay", "0",
            env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        drainer: asyncio.Task[None] | None = None
        try:
            url = await serving_url(proc)
            drainer = asyncio.create_task(drain(proc))  # keep its log pipe flowing
            return await measure(url, str(paths["ca.crt"]), rate, duration, warmup)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if drainer is not None:
                await drainer


async def serving_url(proc: asyncio.subprocess.Process) -> str:
    """The URL from the process's "serving" log line (JSON lines on stderr)."""
    assert proc.stderr is not None

    async def read() -> str:
        assert proc.stderr is not None
        async for line in proc.stderr:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("msg") == "serving":
                    return str(entry["listen"][0])
        raise RuntimeError("the webhook exited before serving")

    return await asyncio.wait_for(read(), 20)


async def drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    async for _ in proc.stderr:
        pass


async def measure(url: str, ca_file: str, rate: float, duration: float, warmup: float) -> int:
    client_ssl = ssl.create_default_context(cafile=ca_file)
    review = json.loads(GOLDEN.read_text())["review"]
    connector = aiohttp.TCPConnector(limit=64, ssl=client_ssl)
    timeout = aiohttp.ClientTimeout(total=10)  # the API server's default webhook timeout
    latencies: list[float] = []
    service: list[float] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float, counted: bool) -> None:
            review["request"]["uid"] = str(uuid.uuid4())
            body = json.dumps(review).encode()
            sent = time.perf_counter()
            try:
                async with session.post(
                    f"{url}/mutate", data=body, server_hostname=SERVER_NAME,
                    headers={"Content-Type": "application/json"},
                ) as response:
                    answer = await response.read()
                    ok = response.status == 200 and b'"patch"' in answer
            except (aiohttp.ClientError, TimeoutError) as e:
                ok, answer = False, repr(e).encode()
            done = time.perf_counter()
            if counted:
                if ok:
                    latencies.append(done - scheduled)
                    service.append(done - sent)
                else:
                    errors.append(answer[:200].decode(errors="replace"))

        total = int((warmup + duration) * rate)
        warm = int(warmup * rate)
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, i >= warm)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start - warmup
        async with session.get(f"{url}/metrics", server_hostname=SERVER_NAME) as response:
            metrics = await response.text()
    return report(latencies, service, errors, rate, duration, elapsed, metrics)


def report(latencies: list[float], service: list[float], errors: list[str], rate: float,
           duration: float, elapsed: float, metrics: str) -> int:
    ms = [x * 1000 for x in latencies]
    sent_ms = [x * 1000 for x in service]
    server = _server_mean_ms(metrics)
    print(f"modelcache webhook admission latency: {rate:g} req/s open loop for {duration:g} s "
          f"over loopback TLS ({len(ms)} answers, {len(errors)} errors, "
          f"{len(ms) / max(elapsed, 1e-9):.1f} req/s achieved)")
    print(f"{'':24}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'mean':>9}")
    for name, values in (("from schedule (ms)", ms), ("from send (ms)", sent_ms)):
        row = [percentile(values, q) for q in (50, 90, 99, 99.9)]
        row += [max(values), statistics.fmean(values)]
        print(f"{name:24}" + "".join(f"{v:9.2f}" for v in row))
    if server is not None:
        p99_bucket = _server_bucket_ms(metrics, 0.99)
        print(f"{'server-side (ms)':24}mean {server:.3f}, p99 <= {p99_bucket:g} (its own "
              "histogram, modelcache_webhook_admission_duration_seconds)")
    print(f"{'Kyverno, published':24}{'':36}{KYVERNO_AVG_MS:18.2f}  "
          "(average at 100 virtual users, their figure, not measured here)")
    p99 = percentile(ms, 99)
    verdict = "met" if p99 < TARGET_P99_MS and not errors else "NOT met"
    print(f"target p99 < {TARGET_P99_MS:g} ms: {verdict} (p99 {p99:.2f} ms)")
    for error in errors[:5]:
        print(f"error: {error}")
    return 0 if verdict == "met" else 1


def _server_mean_ms(metrics: str) -> float | None:
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        for name in ("_sum", "_count"):
            prefix = f"modelcache_webhook_admission_duration_seconds{name} "
            if line.startswith(prefix):
                values[name] = float(line[len(prefix):])
    if not values.get("_count"):
        return None
    return values["_sum"] / values["_count"] * 1000


def _server_bucket_ms(metrics: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q``, in ms."""
    prefix = 'modelcache_webhook_admission_duration_seconds_bucket{le="'
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(prefix):
            bound, _, count = line[len(prefix):].partition('"} ')
            buckets.append((float(bound), float(count)))
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound * 1000
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.rate, args.duration, args.warmup))


if __name__ == "__main__":
    sys.exit(main())


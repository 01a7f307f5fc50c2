"""Reusable helpers: a real Prometheus on loopback, and Grafana queries run through it.

``run_prometheus`` starts the Debian ``prometheus`` binary scraping the given targets, waits
until it is ready and every target has been scraped at least twice (so ``rate()`` has data),
and stops it by PID on exit. ``grafana_to_promql`` substitutes Grafana's variables in a
panel's expression; ``Prometheus.format_query`` and ``Prometheus.query`` run it through the
real PromQL parser and engine. ``check_metrics`` lints an exposition with ``promtool``;
``request`` and ``fetch`` speak HTTP(S) the way a scrape job does (TLS checked for a name).

Nothing here knows what the targets are (``live.py`` starts the real agent and webhook).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

READY_TIMEOUT = 10.0
SCRAPE_TIMEOUT = 20.0  # the first scrape lands ~6 s after start (discovery updates every 5 s)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install prometheus)")
    return path


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only the process we started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@dataclass(frozen=True)
class Target:
    """One scrape target: a job name, ``host:port``, and the labels Kubernetes discovery
    would add (``namespace``, ``node``, ...)."""

    job: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    scheme: str = "http"
    ca_file: str | None = None
    server_name: str | None = None


def scrape_config(targets: Sequence[Target], interval: str = "1s") -> dict[str, Any]:
    """A prometheus.yml with one job per target job name, static targets and labels."""
    jobs: dict[str, dict[str, Any]] = {}
    for t in targets:
        job = jobs.setdefault(t.job, {
            "job_name": t.job,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "scheme": t.scheme,
            "static_configs": [],
        })
        if t.scheme == "https":
            tls: dict[str, Any] = {}
            if t.ca_file:
                tls["ca_file"] = t.ca_file
            if t.server_name:
                tls["server_name"] = t.server_name
            job["tls_config"] = tls
        job["static_configs"].append({"targets": [t.address], "labels": dict(t.labels)})
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": list(jobs.values())}


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """Client of a running Prometheus's HTTP API (just what the tests need)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def _get(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http to loopback)
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def format_query(self, expr: str) -> str:
        """The expression as Prometheus's own parser prints it; raises on a parse error."""
        return str(self._get("/api/v1/format_query", [("query", expr)]))

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (vector or scalar as a one-element list)."""
        data = self._get("/api/v1/query", [("query", expr)])
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._get(f"/api/v1/label/{label}/values", [("match[]", match)]))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["activeTargets"])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=1) as resp:  # noqa: S310
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_for_scrapes(self, jobs: Sequence[str], samples: int = 2,
                         timeout: float = SCRAPE_TIMEOUT) -> None:
        """Poll until every target of every job is up and has ``samples`` samples of ``up``."""
        deadline = time.monotonic() + timeout
        pending: list[str] = list(jobs)
        while pending:
            pending = [job for job in jobs if not self._scraped(job, samples)]
            if not pending:
                return
            if time.monotonic() > deadline:
                health = [(t["labels"].get("job"), t["health"], t["lastError"])
                          for t in self.targets()]
                raise TimeoutError(f"jobs {pending} not scraped {samples}x in {timeout}s: {health}")
            time.sleep(0.2)

    def wait_for_scrape_after(self, jobs: Sequence[str], when: float,
                              timeout: float = SCRAPE_TIMEOUT) -> None:
        """Poll until every target of every job has been scraped by a scrape that started
        after ``when`` (Unix time): what happened before ``when`` is in the database."""
        deadline = time.monotonic() + timeout
        for job in jobs:
            while not self.query(f'min(timestamp(up{{job="{job}"}})) > {when:.3f}'):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job} not scraped after {when} in {timeout}s")
                time.sleep(0.1)

    def _scraped(self, job: str, samples: int) -> bool:
        result = self.query(f'min(count_over_time(up{{job="{job}"}}[1m]))'
                            f' and min(up{{job="{job}"}}) == 1')
        return bool(result) and float(result[0]["value"][1]) >= samples


@contextlib.contextmanager
def run_prometheus(workdir: Path, targets: Sequence[Target], interval: str = "1s",
                   rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """Start a real Prometheus on 127.0.0.1 scraping ``targets``; stop it on exit.

    Ready at ``/-/ready``; returns once every job has been scraped twice.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = scrape_config(targets, interval)
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary("prometheus"), f"--config.file={config_file}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not prom.ready():
            if proc.poll() is not None:
                log_text = (workdir / "prometheus.log").read_text()
                raise PrometheusError(f"prometheus exited: {log_text}")
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready")
            time.sleep(0.05)
        prom.wait_for_scrapes(sorted({t.job for t in targets}))
        yield prom
    finally:
        stop_process(proc)
        log.close()


# -- Grafana ---------------------------------------------------------------------------

#: what Grafana's built-in interval variables become in a test scraping every second
BUILTIN_VARIABLES = {
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "5m",
    "__interval_ms": "5000",
    "__range_s": "300",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]")


def grafana_to_promql(expr: str, variables: Mapping[str, str]) -> str:
    """Substitute Grafana's variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) the way
    Grafana would before sending the query; built-in interval variables get test values.
    An unknown variable is an error, not left in place."""
    values = {**BUILTIN_VARIABLES, **variables}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3) or m.group(4)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(sub, expr)


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every Prometheus target expression of every panel (rows' nested panels included)."""
    out: list[PanelQuery] = []

    def walk(panels: Sequence[Mapping[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            out.extend(PanelQuery(p.get("title", ""), t.get("refId", ""), t["expr"])
                       for t in p.get("targets", []) if t.get("expr"))

    walk(dashboard.get("panels", []))
    return out


def variable_query(variable: Mapping[str, Any]) -> str:
    q = variable.get("query")
    return str(q.get("query", "") if isinstance(q, Mapping) else q)


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str, str | None]:
    """``label_values(metric{...}, label)`` -> (label, match selector or None)."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("label"), m.group("match")


# -- exposition lint --------------------------------------------------------------------

def check_metrics(exposition: bytes) -> list[str]:
    """``promtool check metrics`` problems in an exposition (empty when clean)."""
    proc = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition,
                          capture_output=True, timeout=30, check=False)
    text = (proc.stdout + proc.stderr).decode()
    return [line for line in text.splitlines() if line.strip()] if proc.returncode else []


def request(url: str, *, method: str = "GET", body: bytes | None = None,
            headers: Mapping[str, str] | None = None, ca_file: str | None = None,
            server_name: str | None = None) -> tuple[int, bytes]:
    """One HTTP(S) request; the status and body. HTTPS is verified against ``ca_file`` for
    the name ``server_name`` (default: the URL's host), as a scrape job's ``tls_config``
    and the API server calling a Service do: connect to the address, check the name."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca_file)
        name = server_name or host
        raw = socket.create_connection((host, port), timeout=10)
        conn = http.client.HTTPConnection(name, port, timeout=10)
        conn.sock = context.wrap_socket(raw, server_hostname=name)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                     body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fetch(url: str, ca_file: str | None = None, server_name: str | None = None) -> bytes:
    """GET a URL (an exposition): the body of a 200."""
    status, body = request(url, ca_file=ca_file, server_name=server_name)
    if status != 200:
        raise PrometheusError(f"GET {url}: HTTP {status}")
    return body

"""``python -m webhook`` as a real process: serving over TLS, what it logs without cluster
access, namespace labels from a (fake) API server through a kubeconfig, graceful SIGTERM;
and ``webhook certs`` minting a CA and serving certificate and patching the caBundle."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from webhook_testkit import (
    WEBHOOK_TOKEN,
    WEBHOOK_USER,
    CertFiles,
    admission_review,
    apply,
    decoded_patch,
)

import webhook
from tests.kubeapi import FakeKubeApi
from tests.kubeapi.objects import namespace
from webhook.tls import not_after

ROOT = Path(webhook.__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
TIMEOUT = 20
ENFORCE = "pod-security.kubernetes.io/enforce"


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    logs: list[dict[str, Any]] = field(default_factory=list)
    #: stderr lines that are not JSON (there should be none)
    raw: list[str] = field(default_factory=list)
    url: str = ""
    closed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_log(self, message: str) -> dict[str, Any]:
        """The first log entry with this message, once the process has written it."""
        return await self._wait(lambda entry: entry.get("msg") == message, repr(message))

    async def wait_log_from(self, logger: str) -> dict[str, Any]:
        """The first log entry of this logger, once the process has written it."""
        return await self._wait(lambda entry: entry.get("logger") == logger, f"{logger} entry")

    async def _wait(self, match: Callable[[dict[str, Any]], bool], what: str
                    ) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                self.changed.clear()
                for entry in self.logs:
                    if match(entry):
                        return entry
                if self.closed:
                    raise AssertionError(f"no {what} in the log: {self.logs} {self.raw}")
                await self.changed.wait()
        return await asyncio.wait_for(find(), TIMEOUT)


def env_for(kubeconfig: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["PYTHONPATH"] = str(ROOT)
    env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else "/nonexistent/kubeconfig"
    return env


@contextlib.asynccontextmanager
async def running(args: list[str], env: dict[str, str]) -> AsyncIterator[Process]:
    """The webhook as a child process; SIGTERM, then SIGKILL after 5 s, on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    process = Process(proc)

    async def read() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            try:
                process.logs.append(json.loads(line))
            except ValueError:
                process.raw.append(line.decode(errors="replace"))
            process.changed.set()
        process.closed = True
        process.changed.set()

    reader = asyncio.create_task(read())
    try:
        serving = await process.wait_log("serving")
        process.url = serving["listen"][0]
        yield process
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await reader


def serve_args(cert_files: CertFiles, *extra: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--tls-cert", str(cert_files.cert),
            "--tls-key", str(cert_files.key), "--shutdown-delay", "0.2", *extra]


async def admit(url: str, client_ssl: ssl.SSLContext, review: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/mutate", json=review, ssl=client_ssl,
    ) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


def golden_pod(name: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())["review"][
        "request"]["object"]
    return pod


async def test_serves_without_cluster_access_and_stops_on_sigterm(
    no_leaked_tasks: None, cert_files: CertFiles, client_ssl: ssl.SSLContext
) -> None:
    async with running(serve_args(cert_files), env_for(None)) as process:
        pod = golden_pod("cache-defaults")
        body = await admit(process.url, client_ssl, admission_review(pod))
        response = body["response"]
        mutated = apply(pod, decoded_patch(response))
        assert mutated["spec"]["initContainers"][0]["name"] == "modelcache-init"
        # labels unknown: cache mode, and the pod's author is told why
        assert any("namespace labels unknown" in w for w in response["warnings"])
        async with aiohttp.ClientSession() as session, session.get(
            f"{process.url}/readyz", ssl=client_ssl
        ) as ready:
            assert ready.status == 200
        async with aiohttp.ClientSession() as session, session.get(
            f"{process.url}/metrics", ssl=client_ssl
        ) as scraped:
            exposition = await scraped.text()
        samples = {s.name: s.value for f in text_string_to_metric_families(exposition)
                   for s in f.samples}
        assert samples["modelcache_webhook_cert_expiry_timestamp_seconds"] == not_after(
            cert_files.cert.read_bytes())
        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.proc.wait(), TIMEOUT) == 0
        await process.wait_log("stopped")
    assert process.raw == []
    no_access = [e for e in process.logs if e["msg"].startswith("no cluster access")]
    assert len(no_access) == 1 and no_access[0]["level"] == "warning"
    assert all(e["level"] != "error" for e in process.logs)
    mutations = [e for e in process.logs if e["msg"] == "admission mutated"]
    assert mutations and mutations[0]["uid"] and mutations[0]["mode"] == "cache"


async def test_aiohttp_errors_are_json_lines_too(
    no_leaked_tasks: None, cert_files: CertFiles, client_ssl: ssl.SSLContext
) -> None:
    """A request aiohttp's parser refuses is logged by aiohttp.server itself: the line comes
    out in the webhook's JSON format, not as plain text."""
    async with running(serve_args(cert_files), env_for(None)) as process:
        host, port = process.url.removeprefix("https://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=client_ssl,
                                                       server_hostname=host)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n")
        await writer.drain()
        assert b" 400 " in await reader.readline()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
        entry = await process.wait_log_from("aiohttp.server")
    assert entry["level"] == "error" and entry["msg"].startswith("Error handling request")
    assert "exception" in entry and entry["ts"].endswith("Z")
    assert process.raw == []


async def test_namespace_labels_choose_the_mode(
    kube_api: FakeKubeApi, cert_files: CertFiles, client_ssl: ssl.SSLContext, tmp_path: Path
) -> None:
    """Through a kubeconfig (the webhook's service account, under its RBAC from deploy/),
    the process watches namespaces: a namespace that enforces `restricted` gets download
    mode; relabelled `privileged`, cache mode."""
    c = kube_api.cluster
    c.create("namespaces", namespace("ml", {ENFORCE: "restricted"}))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig", token=WEBHOOK_TOKEN)
    async with running(serve_args(cert_files), env_for(kubeconfig)) as process:
        listed = await process.wait_log("informer listed")
        assert listed["resource"] == "namespaces" and listed["objects"] >= 2
        pod = golden_pod("cache-defaults")

        async def mode() -> str:
            response = (await admit(process.url, client_ssl, admission_review(pod)))["response"]
            mutated = apply(pod, decoded_patch(response))
            value: str = json.loads(mutated["metadata"]["annotations"]["modelcache.io/injected"])[
                "mode"]
            return value

        assert await mode() == "download"
        await asyncio.wait_for(kube_api.wait_for_watch("namespaces"), TIMEOUT)
        c.patch("namespaces", "ml", {"metadata": {"labels": {ENFORCE: "privileged"}}})
        # the watch delivers the change; poll the answer until it follows (bounded)
        for _ in range(200):
            if await mode() == "cache":
                break
            await asyncio.sleep(0.01)
        assert await mode() == "cache"
    assert not any(e["msg"].startswith("no cluster access") for e in process.logs)
    assert WEBHOOK_TOKEN not in json.dumps(process.logs)
    assert process.raw == []
    mine = [r for r in kube_api.requests if r.user == WEBHOOK_USER]
    assert mine and [r for r in mine if r.status == 403] == [], "the webhook's RBAC suffices"
    assert all(r.status < 300 for r in mine if r.resource != "leases")


async def test_certs_mints_a_working_pair_and_patches_the_ca_bundle(
    kube_api: FakeKubeApi, tmp_path: Path
) -> None:
    kube_api.cluster.create("mutatingwebhookconfigurations", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "modelcache"},
        "webhooks": [{"name": "pods.modelcache.io", "admissionReviewVersions": ["v1"],
                      "sideEffects": "None", "clientConfig": {
                          "service": {"name": "modelcache-webhook", "namespace": "modelcache",
                                      "path": "/mutate"}}}],
    })
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")  # cluster admin
    out = tmp_path / "certs"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", "certs", "--service", "modelcache-webhook",
        "--namespace", "modelcache", "--out-dir", str(out), "--webhook-config", "modelcache",
        env=env_for(kubeconfig), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    ca_bundle = stdout.decode().strip()
    assert base64.b64decode(ca_bundle) == (out / "ca.crt").read_bytes()
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    webhook_config = kube_api.cluster.get("mutatingwebhookconfigurations", "modelcache")
    assert webhook_config["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle
    assert webhook_config["webhooks"][0]["clientConfig"]["service"]["path"] == "/mutate"
    # a real handshake: the API server trusts the bundle and checks the Service's name
    for name in ("modelcache-webhook.modelcache.svc",
                 "modelcache-webhook.modelcache.svc.cluster.local"):
        await handshake(out, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(out, "other.modelcache.svc")


async def handshake(out: Path, server_name: str) -> None:
    server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ssl.load_cert_chain(out / "tls.crt", out / "tls.key")
    client_ssl = ssl.create_default_context(cafile=str(out / "ca.crt"))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl, server_hostname=server_name)
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_certs_without_cluster_access_still_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from webhook.main import main

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    code = main(["certs", "--service", "s", "--namespace", "n", "--out-dir",
                 str(tmp_path / "o"), "--webhook-config", "x"])
    captured = capsys.readouterr()
    assert code == 0
    assert base64.b64decode(captured.out.strip()) == (tmp_path / "o" / "ca.crt").read_bytes()
    assert "not patched" in captured.err


def test_bad_flags_exit_2(cert_files: CertFiles, capsys: pytest.CaptureFixture[str]) -> None:
    from webhook.main import main

    base = ["--tls-cert", str(cert_files.cert), "--tls-key", str(cert_files.key)]
    assert main([*base, "--image", "ghcr.io/modelcache/modelcache:latest"]) == 2
    assert main([*base, "--store-path", "relative/path"]) == 2
    assert main([*base, "--listen", "nowhere"]) == 2
    assert main([]) == 2
    assert "pinned" in capsys.readouterr().err
    assert main([*base, "--allow-host", "registry.corp:http"]) == 2
    assert "--allow-host entry 'registry.corp:http' is not HOST[:PORT]" in capsys.readouterr().err


def test_init_env_and_ca_reach_the_init_container(
        cert_files: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--init-env and --init-ca-file: where the init container's own download finds the
    sources (an air-gapped mirror) and which CA it trusts; never credentials."""
    from webhook.main import main, serve_parser, settings_from
    from webhook.plan import Plan, plan

    ca_pem = trustme.CA().cert_pem.bytes().decode()
    (tmp_path / "ca.pem").write_text(ca_pem)
    base = ["--tls-cert", str(cert_files.cert), "--tls-key", str(cert_files.key)]
    args = serve_parser({}).parse_args([
        *base, "--init-env", "HF_ENDPOINT=https://hf-mirror.internal",
        "--init-env", "AWS_ENDPOINT_URL=http://minio.data:9000",
        "--init-ca-file", str(tmp_path / "ca.pem")])
    _, planning = settings_from(args)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "labels": {"modelcache.io/inject": "true"},
                        "annotations": {"modelcache.io/model": "hf://org/m@main"}},
           "spec": {"containers": [{"name": "app", "image": "x"}]}}
    result = plan(pod, {}, planning)
    assert isinstance(result, Plan)
    env = {e["name"]: e.get("value") for e in result.pod["spec"]["initContainers"][0]["env"]}
    assert env["HF_ENDPOINT"] == "https://hf-mirror.internal"
    assert env["AWS_ENDPOINT_URL"] == "http://minio.data:9000"
    assert env["MODELCACHE_CA_PEM"] == ca_pem

    assert main([*base, "--init-env", "AWS_SECRET_ACCESS_KEY=x"]) == 2
    assert "credentials go in the pod's credentials Secret" in capsys.readouterr().err
    assert main([*base, "--init-env", "HF_ENDPOINT"]) == 2
    assert "must be NAME=VALUE" in capsys.readouterr().err
    (tmp_path / "junk.pem").write_text("hello")
    assert main([*base, "--init-ca-file", str(tmp_path / "junk.pem")]) == 2
    assert "not a PEM bundle" in capsys.readouterr().err


async def test_with_csi_every_pod_gets_the_driver_volume(
    no_leaked_tasks: None, cert_files: CertFiles, client_ssl: ssl.SSLContext
) -> None:
    """``--csi``: the driver is installed, so mode csi is the default, whatever the
    namespace's labels (here unknown), and no init container is injected."""
    async with running([*serve_args(cert_files), "--csi"], env_for(None)) as process:
        pod = golden_pod("download-restricted-namespace")
        response = (await admit(process.url, client_ssl, admission_review(pod)))["response"]
        mutated = apply(pod, decoded_patch(response))
        volumes = {v["name"]: v for v in mutated["spec"]["volumes"]}
        assert volumes["modelcache-model"]["csi"]["driver"] == "csi.modelcache.io"
        assert "initContainers" not in mutated["spec"]
        assert not any("namespace labels unknown" in w for w in response.get("warnings", []))
    mutations = [e for e in process.logs if e["msg"] == "admission mutated"]
    assert mutations and mutations[0]["mode"] == "csi"

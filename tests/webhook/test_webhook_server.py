"""The real webhook server over TLS on 127.0.0.1: admission round trip as kube-apiserver
does it, certificate rotation, transport errors, crashes, probes and metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from webhook_testkit import (
    CertFiles,
    RunningWebhook,
    apply,
    decoded_patch,
    make_deps,
    serve,
    validate_pod,
)

from webhook.namespaces import NamespaceCache
from webhook.plan import Denial, Plan
from webhook.settings import PlanSettings
from webhook.tls import CertReloader

GOLDEN = Path(__file__).parent / "golden"
JSON = {"Content-Type": "application/json"}


def golden_review(name: str) -> dict[str, Any]:
    review: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())["review"]
    return review


async def post(
    url: str, client_ssl: ssl.SSLContext, body: bytes, headers: Mapping[str, str] = JSON,
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/mutate", data=io.BytesIO(body), headers=headers, ssl=client_ssl,
    ) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_admission_round_trip_over_tls(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext
) -> None:
    """Posted as kube-apiserver would (TLS to the Service name's cert, JSON, timeout 10 s),
    the response parsed, the patch applied and the pod validated."""
    review = golden_review("cache-defaults")
    status, body = await post(webhook.url, client_ssl, json.dumps(review).encode())
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    mutated = apply(review["request"]["object"], decoded_patch(response))
    validate_pod(mutated)
    assert mutated["spec"]["initContainers"][0]["name"] == "modelcache-init"
    assert webhook.deps.metrics.admissions.labels(outcome="mutated")._value.get() == 1


async def peer_certificate(url: str, client_ssl: ssl.SSLContext) -> bytes:
    """The certificate the server presents in a brand-new handshake."""
    port = int(url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der: bytes = ssl_object.getpeercert(binary_form=True)
        return der
    finally:
        writer.close()
        await writer.wait_closed()


async def test_certificate_rotation(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext, cert_files: CertFiles,
    ca: trustme.CA,
) -> None:
    first = await peer_certificate(webhook.url, client_ssl)
    loads = webhook.reloader.loads
    cert_files.write(ca.issue_cert("127.0.0.1", "localhost"))
    await asyncio.wait_for(webhook.reloader.wait_for(loads=loads + 1), timeout=10)
    second = await peer_certificate(webhook.url, client_ssl)
    assert second != first
    status, _ = await post(webhook.url, client_ssl,
                           json.dumps(golden_review("skip-delete")).encode())
    assert status == 200
    reloads = webhook.deps.metrics.cert_reloads
    assert reloads.labels(result="ok")._value.get() == 1


async def test_half_written_pair_keeps_the_old_certificate(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext, cert_files: CertFiles,
    ca: trustme.CA,
) -> None:
    """A new certificate next to the old key is refused; the server keeps serving the old
    one, and takes the pair once the key arrives."""
    before = await peer_certificate(webhook.url, client_ssl)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    tmp = cert_files.cert.with_suffix(".new")
    tmp.write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    tmp.replace(cert_files.cert)
    await asyncio.wait_for(webhook.reloader.wait_for(failures=1), timeout=10)
    assert await peer_certificate(webhook.url, client_ssl) == before
    cert_files.write(issued)
    await asyncio.wait_for(webhook.reloader.wait_for(loads=2), timeout=10)
    assert await peer_certificate(webhook.url, client_ssl) != before


async def test_body_too_large_is_413(webhook: RunningWebhook, client_ssl: ssl.SSLContext) -> None:
    big = b'{"pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    status, body = await post(webhook.url, client_ssl, big)
    assert status == 413
    assert "larger than" in body["error"]


async def test_body_too_large_without_length_is_413(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext
) -> None:
    async def chunks() -> Any:
        for _ in range(4):
            yield b"x" * (1024 * 1024)

    async with aiohttp.ClientSession() as session, session.post(
        f"{webhook.url}/mutate", data=chunks(), headers=JSON, ssl=client_ssl,
    ) as response:
        assert response.status == 413


async def test_wrong_content_type_is_415(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext
) -> None:
    body = json.dumps(golden_review("cache-defaults")).encode()
    status, answer = await post(webhook.url, client_ssl, body, {"Content-Type": "text/plain"})
    assert status == 415
    assert "application/json" in answer["error"]
    assert webhook.deps.metrics.admissions.labels(outcome="error")._value.get() == 1


@pytest.mark.parametrize(("body", "why"), [
    (b"{not json", "not JSON"),
    (b'{"kind": "Pod"}', "not an AdmissionReview"),
    (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v2"}', "apiVersion"),
    (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
     "request.uid"),
])
async def test_not_a_review_is_400(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext, body: bytes, why: str
) -> None:
    status, answer = await post(webhook.url, client_ssl, body)
    assert status == 400
    assert why in answer["error"]


async def test_malformed_pod_is_an_errored_response_with_uid(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext
) -> None:
    review = golden_review("cache-defaults")
    review["request"]["object"]["spec"]["containers"] = "server"
    status, body = await post(webhook.url, client_ssl, json.dumps(review).encode())
    assert status == 200
    response = body["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400


async def test_crash_is_an_errored_response_with_uid(
    no_leaked_tasks: None, cert_files: CertFiles, client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_planner(
        pod: Mapping[str, Any], labels: Mapping[str, str] | None, settings: PlanSettings,
        namespace: str | None = None,
    ) -> Plan | Denial:
        raise RuntimeError("planner bug")

    reloader = CertReloader(str(cert_files.cert), str(cert_files.key), logging.getLogger())
    deps = make_deps(reloader, PlanSettings(), NamespaceCache(), broken_planner)
    review = golden_review("cache-defaults")
    with caplog.at_level(logging.ERROR, logger="modelcache.webhook.test"):
        async with serve(deps, reloader) as url:
            status, body = await post(url, client_ssl, json.dumps(review).encode())
    reloader.close()
    assert status == 200
    response = body["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 500
    assert "RuntimeError" in response["status"]["message"]
    assert "planner bug" not in response["status"]["message"]
    assert deps.metrics.admissions.labels(outcome="error")._value.get() == 1
    assert any(r.exc_info and "planner bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_denial_and_warnings_over_the_wire(
    webhook: RunningWebhook, client_ssl: ssl.SSLContext
) -> None:
    review = golden_review("deny-private-host")
    status, body = await post(webhook.url, client_ssl, json.dumps(review).encode())
    assert status == 200
    assert body["response"]["allowed"] is False
    assert body["response"]["status"]["code"] == 403
    assert "modelcache.io/model" in body["response"]["status"]["message"]
    assert webhook.deps.metrics.admissions.labels(outcome="denied")._value.get() == 1


async def test_probes_and_metrics(webhook: RunningWebhook, client_ssl: ssl.SSLContext) -> None:
    await post(webhook.url, client_ssl, json.dumps(golden_review("cache-defaults")).encode())
    await post(webhook.url, client_ssl, json.dumps(golden_review("skip-delete")).encode())
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(webhook.url + path, ssl=client_ssl) as response:
                assert response.status == 200
        async with session.get(webhook.url + "/metrics", ssl=client_ssl) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        webhook.deps.health.ready = False
        async with session.get(webhook.url + "/readyz", ssl=client_ssl) as response:
            assert response.status == 503
    assert 'modelcache_webhook_admissions_total{outcome="mutated"} 1.0' in text
    assert 'modelcache_webhook_admissions_total{outcome="skipped"} 1.0' in text
    assert 'modelcache_webhook_admissions_total{outcome="denied"} 0.0' in text
    assert 'modelcache_webhook_admission_duration_seconds_bucket{le="0.0005"}' in text
    assert "modelcache_webhook_admission_duration_seconds_count 2.0" in text

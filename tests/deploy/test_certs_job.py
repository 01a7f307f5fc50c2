"""The self-signed overlay's certs Job, run as its container would run it (``modelcache`` plus
the Job's args, the kubelet's ``$(VAR)`` expansion applied) against the fake kube-apiserver
holding the overlay's own objects, with RBAC enforced from the overlay's own roles: the Job's
identity may do exactly what the command needs, the webhook's may not, and a second run
writes nothing."""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.deploy import render
from tests.deploy.render import ROOT, expanded_args, find
from tests.kubeapi import FakeKubeApi
from webhook import certs

NAMESPACE = "modelcache"
JOB_SA, JOB_TOKEN = "modelcache-webhook-certs", "certs-job-token"
WEBHOOK_SA, WEBHOOK_TOKEN = "modelcache-webhook", "webhook-token"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render.render("self-signed")


@pytest.fixture
async def api(docs: list[dict[str, Any]]) -> AsyncIterator[FakeKubeApi]:
    """The fake API server with the overlay's namespace, webhook configuration and RBAC."""
    async with FakeKubeApi(enforce_rbac=True) as fake:
        fake.cluster.create("namespaces", find(docs, "Namespace", NAMESPACE))
        fake.cluster.create("mutatingwebhookconfigurations",
                            find(docs, "MutatingWebhookConfiguration", "modelcache"))
        fake.auth.load_rbac(docs)
        fake.auth.add_service_account_token(JOB_TOKEN, NAMESPACE, JOB_SA)
        fake.auth.add_service_account_token(WEBHOOK_TOKEN, NAMESPACE, WEBHOOK_SA)
        yield fake


async def run_job(docs: list[dict[str, Any]], api: FakeKubeApi, token: str,
                  tmp_path: Path, kind: str = "Job") -> tuple[int, str]:
    """``modelcache <the Job's args>`` (or the renewal CronJob's) as a process, as the
    identity behind ``token``."""
    if kind == "Job":
        spec = find(docs, "Job", "modelcache-webhook-certs")["spec"]
    else:
        spec = find(docs, "CronJob", "modelcache-webhook-certs-renew")["spec"]["jobTemplate"][
            "spec"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(PYTHONPATH=str(ROOT),
               KUBECONFIG=str(api.write_kubeconfig(tmp_path / f"{token}.kubeconfig", token)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *expanded_args(container), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def writes(api: FakeKubeApi) -> int:
    return sum(1 for r in api.requests if r.verb in ("create", "update", "patch"))


@pytest.mark.slow
async def test_the_job_creates_the_secret_the_webhook_mounts_and_sets_the_ca_bundle(
    docs: list[dict[str, Any]], api: FakeKubeApi, tmp_path: Path
) -> None:
    code, err = await run_job(docs, api, JOB_TOKEN, tmp_path)
    assert code == 0, err
    assert not [r for r in api.requests if r.status == 403]
    # the Secret is the one the webhook Deployment mounts, and names the Service it serves
    webhook = find(docs, "Deployment", "modelcache-webhook")["spec"]["template"]["spec"]
    (tls,) = [v["secret"]["secretName"] for v in webhook["volumes"] if "secret" in v]
    secret = api.cluster.get("secrets", tls, NAMESPACE)
    assert secret["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    (hook,) = api.cluster.get("mutatingwebhookconfigurations", "modelcache")["webhooks"]
    service = hook["clientConfig"]["service"]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{service['name']}.{service['namespace']}.svc" in names.get_values_for_type(
        x509.DNSName)
    # the API server trusts the CA that signed it
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    cert.verify_directly_issued_by(ca)

    before = writes(api)
    code, err = await run_job(docs, api, JOB_TOKEN, tmp_path)  # a later apply runs it again
    assert code == 0, err
    assert "kept" in err and "already current" in err
    assert writes(api) == before


async def test_the_webhooks_own_identity_cannot_do_it(
    docs: list[dict[str, Any]], api: FakeKubeApi, tmp_path: Path
) -> None:
    code, err = await run_job(docs, api, WEBHOOK_TOKEN, tmp_path)
    assert code == 1 and "403 Forbidden" in err
    assert not api.cluster.exists("secrets", "modelcache-webhook-tls", NAMESPACE)
    assert "caBundle" not in api.cluster.get("mutatingwebhookconfigurations", "modelcache")[
        "webhooks"][0]["clientConfig"]


@pytest.mark.slow
async def test_the_cronjob_renews_a_pair_before_it_expires(
    docs: list[dict[str, Any]], api: FakeKubeApi, tmp_path: Path
) -> None:
    """Nobody applies the overlay again: the daily CronJob finds the serving certificate 15
    days from expiry, re-mints it, keeps the old CA trusted beside the new one, and a run the
    next day writes nothing."""
    cron = find(docs, "CronJob", "modelcache-webhook-certs-renew")
    job = find(docs, "Job", "modelcache-webhook-certs")
    (renew,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (first,) = job["spec"]["template"]["spec"]["containers"]
    assert expanded_args(renew)[:6] == expanded_args(first)  # the same command, same names
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == \
        job["spec"]["template"]["spec"]["serviceAccountName"]
    now = datetime.datetime.now(datetime.UTC)
    old = certs.mint("modelcache-webhook", NAMESPACE, days=365,
                     now=now - datetime.timedelta(days=350))
    api.cluster.create("secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "modelcache-webhook-tls", "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in (
            ("tls.crt", old.cert_pem), ("tls.key", old.key_pem), ("ca.crt", old.ca_pem))}},
        NAMESPACE)

    code, err = await run_job(docs, api, JOB_TOKEN, tmp_path, kind="CronJob")
    assert code == 0, err
    assert "renewed" in err
    secret = api.cluster.get("secrets", "modelcache-webhook-tls", NAMESPACE)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert.not_valid_after_utc > now + datetime.timedelta(days=300)
    bundle = base64.b64decode(api.cluster.get("mutatingwebhookconfigurations", "modelcache")[
        "webhooks"][0]["clientConfig"]["caBundle"])
    assert old.ca_pem.strip() in bundle  # the old CA stays trusted until it expires
    before = writes(api)
    code, err = await run_job(docs, api, JOB_TOKEN, tmp_path, kind="CronJob")
    assert code == 0 and "kept" in err
    assert writes(api) == before

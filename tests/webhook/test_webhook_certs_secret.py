"""``modelcache webhook certs --secret``: the serving pair kept in a ``kubernetes.io/tls``
Secret, against the fake kube-apiserver of ``tests/kubeapi`` (Secrets with their type rules,
resourceVersion conflicts, JSON patches with ``test``): created when missing, kept while
good, renewed near expiry or when broken (the old CA still trusted), never overwriting a
concurrent writer; the caBundle patched only when it differs."""

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
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import webhook
from common.errors import Conflict
from common.kube.client import KubeClient, connect
from tests.kubeapi import FakeKubeApi
from webhook import certs

ROOT = Path(webhook.__file__).resolve().parent.parent
NS, SERVICE, CONFIG = "modelcache", "modelcache-webhook", "modelcache"
SECRET = "modelcache-webhook-tls"
DAY = datetime.timedelta(days=1)


@pytest.fixture
def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
async def api(no_leaked_tasks: None) -> AsyncIterator[FakeKubeApi]:
    """The fake API server with the namespace and the base's MutatingWebhookConfiguration."""
    async with FakeKubeApi() as fake:
        fake.cluster.create("namespaces", {"metadata": {"name": NS}})
        manifest = ROOT / "deploy" / "base" / "mutatingwebhookconfiguration.yaml"
        fake.cluster.create("mutatingwebhookconfigurations", yaml.safe_load(manifest.read_text()))
        yield fake


@pytest.fixture
async def kube(api: FakeKubeApi, tmp_path: Path) -> AsyncIterator[KubeClient]:
    async with await connect(str(api.write_kubeconfig(tmp_path / "admin.kubeconfig"))) as client:
        yield client


def secret(api: FakeKubeApi) -> dict[str, Any]:
    return api.cluster.get("secrets", SECRET, NS)


def pems(obj: dict[str, Any], key: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(base64.b64decode(obj["data"][key]))


def writes(api: FakeKubeApi, resource: str) -> int:
    return sum(api.count(verb, resource) for verb in ("create", "update", "patch"))


async def test_created_then_kept(api: FakeKubeApi, kube: KubeClient, now: datetime.datetime
                                 ) -> None:
    first = await certs.ensure_secret(kube, SECRET, SERVICE, NS)
    assert (first.action, first.why) == ("created", "the Secret does not exist")
    stored = secret(api)
    assert stored["type"] == "kubernetes.io/tls"
    assert base64.b64decode(stored["data"]["tls.crt"]) == first.pair.cert_pem
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
        "modelcache-webhook-certs"
    assert certs.problem(first.pair, SERVICE, NS, now) == ""
    (leaf,) = pems(stored, "tls.crt")
    assert abs(leaf.not_valid_after_utc - now - DAY * 365) < datetime.timedelta(minutes=1)

    again = await certs.ensure_secret(kube, SECRET, SERVICE, NS)
    assert again.action == "kept" and again.pair == first.pair
    assert writes(api, "secrets") == 1
    assert secret(api)["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


async def test_renewed_near_expiry_keeping_the_old_ca_trusted(
    api: FakeKubeApi, kube: KubeClient, now: datetime.datetime
) -> None:
    first = await certs.ensure_secret(kube, SECRET, SERVICE, NS, days=60)
    old_ca = pems(secret(api), "ca.crt")
    assert len(old_ca) == 1
    assert (await certs.ensure_secret(kube, SECRET, SERVICE, NS, now=now + DAY * 29)).action \
        == "kept"

    later = now + DAY * 31  # 29 days left: inside the 30-day renewal window
    renewed = await certs.ensure_secret(kube, SECRET, SERVICE, NS, days=60, now=later)
    assert renewed.action == "renewed" and "serving certificate expires" in renewed.why
    assert renewed.pair.cert_pem != first.pair.cert_pem
    new_ca, kept_ca = pems(secret(api), "ca.crt")
    assert kept_ca == old_ca[0] and new_ca != old_ca[0]
    assert certs.problem(renewed.pair, SERVICE, NS, later) == ""
    # the bundle the API server gets trusts both the old serving certificate and the new one
    bundle = base64.b64decode(renewed.pair.ca_bundle)
    assert old_ca[0].public_bytes(Encoding.PEM) in bundle

    # at the next renewal the CA from two generations ago is dropped
    third = await certs.ensure_secret(kube, SECRET, SERVICE, NS, days=60, now=later + DAY * 31)
    assert third.action == "renewed"
    assert pems(secret(api), "ca.crt")[1] == new_ca


def _broken(how: str, stored: dict[str, Any], other: certs.Minted) -> None:
    data = stored["data"]
    if how == "missing ca.crt":
        del data["ca.crt"]
    elif how == "foreign key":
        data["tls.key"] = base64.b64encode(other.key_pem).decode()
    elif how == "foreign CA":
        data["ca.crt"] = base64.b64encode(other.ca_pem).decode()
    elif how == "other service":
        data["tls.crt"] = base64.b64encode(other.cert_pem).decode()
        data["tls.key"] = base64.b64encode(other.key_pem).decode()
        data["ca.crt"] = base64.b64encode(other.ca_pem).decode()
    elif how == "garbage":
        data["tls.crt"] = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nxx\n").decode()


@pytest.mark.parametrize(("how", "why"), [
    ("missing ca.crt", "has no ca.crt"),
    ("foreign key", "is not the key of tls.crt"),
    ("foreign CA", "did not sign tls.crt"),
    ("other service", "does not name modelcache-webhook, modelcache-webhook.modelcache"),
    ("garbage", "cannot be read"),
])
async def test_a_broken_pair_is_replaced(
    api: FakeKubeApi, kube: KubeClient, how: str, why: str, now: datetime.datetime
) -> None:
    await certs.ensure_secret(kube, SECRET, SERVICE, NS)
    stored = secret(api)
    _broken(how, stored, certs.mint("elsewhere", "other"))
    api.cluster.update("secrets", SECRET, stored, NS)
    fixed = await certs.ensure_secret(kube, SECRET, SERVICE, NS)
    assert fixed.action == "renewed" and why in fixed.why, fixed.why
    assert certs.problem(fixed.pair, SERVICE, NS, now) == ""


async def test_a_secret_of_another_type_is_not_taken_over(
    api: FakeKubeApi, kube: KubeClient
) -> None:
    api.cluster.create("secrets", {"metadata": {"name": SECRET}, "type": "Opaque",
                                   "stringData": {"password": "x"}}, NS)
    with pytest.raises(Conflict, match=r"type 'Opaque'.*delete it"):
        await certs.ensure_secret(kube, SECRET, SERVICE, NS)
    assert secret(api)["type"] == "Opaque"
    # and the fake refuses what the API server refuses
    with pytest.raises(Exception, match="field is immutable"):
        api.cluster.update("secrets", SECRET, {**secret(api), "type": "kubernetes.io/tls",
                                               "stringData": {"tls.crt": "a", "tls.key": "b"}},
                           NS)


async def test_a_concurrent_writer_is_never_overwritten(
    api: FakeKubeApi, kube: KubeClient, now: datetime.datetime, tmp_path: Path
) -> None:
    """Another run renews the Secret between our read and our write: our update carries the
    resourceVersion we read, gets 409, and we judge the Secret again (now good: kept)."""
    await certs.ensure_secret(kube, SECRET, SERVICE, NS, days=40)
    later = now + DAY * 20
    theirs: list[certs.Ensured] = []
    real_replace = kube.replace_secret

    async def racing(namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not theirs:  # the other run, with its own client, between our read and our write
            async with await connect(str(api.write_kubeconfig(tmp_path / "other"))) as other:
                theirs.append(await certs.ensure_secret(other, SECRET, SERVICE, NS,
                                                        now=later))
        return await real_replace(namespace, name, body)

    kube.replace_secret = racing  # type: ignore[method-assign]
    ours = await certs.ensure_secret(kube, SECRET, SERVICE, NS, now=later)
    assert theirs[0].action == "renewed"
    assert ours.action == "kept" and ours.pair == theirs[0].pair
    assert api.count("update", "secrets", status=409) == 1
    assert base64.b64decode(secret(api)["data"]["tls.crt"]) == theirs[0].pair.cert_pem


async def test_ca_bundle_is_patched_once(api: FakeKubeApi, kube: KubeClient) -> None:
    pair = certs.mint(SERVICE, NS)
    assert await certs.patch_ca_bundle(kube, CONFIG, pair.ca_bundle) == 1
    hooks = api.cluster.get("mutatingwebhookconfigurations", CONFIG)["webhooks"]
    assert [h["clientConfig"]["caBundle"] for h in hooks] == [pair.ca_bundle]
    assert hooks[0]["clientConfig"]["service"]["path"] == "/mutate"
    assert await certs.patch_ca_bundle(kube, CONFIG, pair.ca_bundle) == 0
    assert api.count("patch", "mutatingwebhookconfigurations") == 1


async def test_ca_bundle_patch_rereads_after_a_concurrent_change(
    api: FakeKubeApi, kube: KubeClient
) -> None:
    pair = certs.mint(SERVICE, NS)
    real_patch = kube.patch_mutating_webhook_configuration
    changed: list[bool] = []

    async def racing(name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        if not changed:  # someone edits the configuration between our read and our patch
            current = api.cluster.get("mutatingwebhookconfigurations", CONFIG)
            current["webhooks"][0]["timeoutSeconds"] = 3
            api.cluster.update("mutatingwebhookconfigurations", CONFIG, current)
            changed.append(True)
        return await real_patch(name, operations)

    kube.patch_mutating_webhook_configuration = racing  # type: ignore[method-assign]
    assert await certs.patch_ca_bundle(kube, CONFIG, pair.ca_bundle) == 1
    (hook,) = api.cluster.get("mutatingwebhookconfigurations", CONFIG)["webhooks"]
    assert hook["timeoutSeconds"] == 3 and hook["clientConfig"]["caBundle"] == pair.ca_bundle
    assert api.count("patch", "mutatingwebhookconfigurations", status=422) == 1


async def run_certs(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", "certs", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_command_creates_then_keeps(api: FakeKubeApi, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(PYTHONPATH=str(ROOT),
               KUBECONFIG=str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    args = ["--service", SERVICE, "--namespace", NS, "--secret", SECRET,
            "--webhook-config", CONFIG]
    code, out, err = await run_certs(*args, env=env)
    assert code == 0, err
    stored = secret(api)
    (hook,) = api.cluster.get("mutatingwebhookconfigurations", CONFIG)["webhooks"]
    assert out.strip() == stored["data"]["ca.crt"] == hook["clientConfig"]["caBundle"]
    assert f"Secret {NS}/{SECRET} created" in err

    before = writes(api, "secrets"), writes(api, "mutatingwebhookconfigurations")
    code, out_again, err = await run_certs(*args, "--out-dir", str(tmp_path / "o"), env=env)
    assert code == 0, err
    assert out_again == out and "kept" in err and "already current" in err
    assert (writes(api, "secrets"), writes(api, "mutatingwebhookconfigurations")) == before
    assert (tmp_path / "o" / "tls.crt").read_bytes() == base64.b64decode(
        stored["data"]["tls.crt"])
    assert (tmp_path / "o" / "tls.key").stat().st_mode & 0o777 == 0o600


async def test_the_command_needs_cluster_access_for_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(PYTHONPATH=str(ROOT), KUBECONFIG=str(tmp_path / "missing"))
    code, out, err = await run_certs("--service", SERVICE, "--namespace", NS,
                                     "--secret", SECRET, env=env)
    assert (code, out) == (1, "") and "no cluster access" in err
    code, _, err = await run_certs("--service", SERVICE, "--namespace", NS, env=env)
    assert code == 2 and "--secret NAME, --out-dir DIR, or both" in err

"""``s3://`` against SeaweedFS (real SigV4 checks) and moto (fast), through the real
pipeline: botocore signs, the egress-checked control client sends, presigned GETs move the
bytes through the fetch engine."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.cli.client import AgentClient
from agent.egress import Egress
from agent.fetch.stats import FetchStats
from agent.index import FAILED
from agent.settings import EgressSettings, SourceSettings
from agent.sources.control import Control
from agent.sources.s3 import S3Source
from common.errors import SourceAuthError, SourceError, SourceNotFound, TransientError
from common.reference import parse
from tests.servers.agent import AgentProcess
from tests.servers.s3 import S3_DOMAIN, S3Endpoint, upload_model
from tests.sources.conftest import LOOPBACK_HOSTS, PipelineFactory, files_named, read_tree

MIB = 1024 * 1024


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "test"}',
        "model-00001-of-00002.safetensors": os.urandom(5 * MIB + 4096),
        "model-00002-of-00002.safetensors": os.urandom(700_000),
        "tokenizer/vocab b+c~=&é.json": b'{"version": "1.0"}',
    }


def keys(endpoint: S3Endpoint, secret: str | None = None) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": secret or endpoint.secret_key}


def settings(endpoint: S3Endpoint, addressing: str = "auto") -> SourceSettings:
    return SourceSettings(s3_endpoint=endpoint.url, s3_region=endpoint.region,
                          s3_addressing=addressing)


def source(endpoint: S3Endpoint, addressing: str = "auto") -> S3Source:
    control = Control(Egress(EgressSettings(allow_hosts=LOOPBACK_HOSTS)), retries=1)
    return S3Source(control, settings(endpoint, addressing))


async def test_prefix_pulled_with_real_sigv4_and_sha256_verified(
    seaweedfs: S3Endpoint, s3_prefix: str, pipeline: PipelineFactory, no_aws_env: None
) -> None:
    files = model_files()
    uploaded = upload_model(
        seaweedfs.client(), seaweedfs.bucket, s3_prefix, files,
        multipart=["model-00001-of-00002.safetensors"],
        checksum_sha256=["model-00002-of-00002.safetensors", "tokenizer/vocab b+c~=&é.json"])
    p = await pipeline(sources=settings(seaweedfs))

    model = await p.pull(f"s3://models/{s3_prefix}", credentials=keys(seaweedfs))

    assert p.tree(model) == files
    assert model.manifest is not None and model.manifest.revision.startswith("etags:")
    stated = {f.path: f.sha256 for f in model.manifest.files}
    assert stated["model-00002-of-00002.safetensors"] == uploaded[
        "model-00002-of-00002.safetensors"].sha256
    assert stated["tokenizer/vocab b+c~=&é.json"] == hashlib.sha256(
        files["tokenizer/vocab b+c~=&é.json"]).hexdigest()


async def test_wrong_keys_refused_naming_the_bucket_never_the_secret(
    seaweedfs: S3Endpoint, s3_prefix: str, pipeline: PipelineFactory, no_aws_env: None
) -> None:
    upload_model(seaweedfs.client(), seaweedfs.bucket, s3_prefix, {"a.bin": b"a"})
    p = await pipeline(sources=settings(seaweedfs))

    wrong_secret = await p.pull(f"s3://models/{s3_prefix}", ok=False,
                                credentials=keys(seaweedfs, secret="not-the-secret-x9"))
    wrong_key = await p.pull(f"s3://models/{s3_prefix}/a.bin", ok=False, credentials={
        "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "not-the-secret-x9"})

    for model in (wrong_secret, wrong_key):
        assert model.state == FAILED and model.error is not None
        assert "s3://models" in model.error and "access denied" in model.error
        assert "not-the-secret-x9" not in model.error
    assert "SignatureDoesNotMatch" in str(wrong_secret.error)
    assert "InvalidAccessKeyId" in str(wrong_key.error)
    assert p.blob_count() == 0


async def test_standard_chain_reads_the_environment(
    seaweedfs: S3Endpoint, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, no_aws_env: None
) -> None:
    upload_model(seaweedfs.client(), seaweedfs.bucket, s3_prefix, {"a.bin": b"a"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    src = source(seaweedfs)
    try:
        resolved = await src.resolve(parse(f"s3://models/{s3_prefix}"), None)
        assert [f.path for f in resolved.files] == ["a.bin"]
        await src.check_access(parse(f"s3://models/{s3_prefix}"), None)
        with pytest.raises(SourceAuthError, match="s3://models"):
            await src.check_access(parse(f"s3://models/{s3_prefix}"),
                                   keys(seaweedfs, secret="wrong"))
    finally:
        await src.close()


async def test_standard_chain_reads_a_named_profile(
    seaweedfs: S3Endpoint, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    no_aws_env: None
) -> None:
    """AWS_PROFILE picks a profile of the shared credentials file; SeaweedFS checks the
    signature, so only the right profile's keys list the prefix."""
    upload_model(seaweedfs.client(), seaweedfs.bucket, s3_prefix, {"a.bin": b"a"})
    (tmp_path / "credentials").write_text(
        f"[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n"
        f"[models]\naws_access_key_id = {seaweedfs.access_key}\n"
        f"aws_secret_access_key = {seaweedfs.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "models")
    src = source(seaweedfs)
    try:
        resolved = await src.resolve(parse(f"s3://models/{s3_prefix}"), None)
        assert [f.path for f in resolved.files] == ["a.bin"]
    finally:
        await src.close()
    monkeypatch.setenv("AWS_PROFILE", "default")
    src = source(seaweedfs)
    try:
        with pytest.raises(SourceAuthError, match="s3://models"):
            await src.resolve(parse(f"s3://models/{s3_prefix}"), None)
    finally:
        await src.close()


async def test_standard_chain_assumes_a_role_with_a_web_identity(
    moto_s3: S3Endpoint, pipeline: PipelineFactory, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, no_aws_env: None
) -> None:
    """IRSA / EKS pod identity: a projected token file and a role ARN in the environment.
    botocore exchanges the token at STS (moto's, in this process) for temporary keys, and
    the listing and the presigned GETs are signed with those."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sts.models import sts_backends

    upload_model(moto_s3.client(), moto_s3.bucket, "irsa", {"a.bin": b"weights"})
    (tmp_path / "token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2ln")
    role = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/modelcache-agent"
    monkeypatch.setenv("AWS_ROLE_ARN", role)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "node-a")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_s3.url)
    assumed = sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assumed_roles
    before = len(assumed)
    p = await pipeline(sources=settings(moto_s3))

    model = await p.pull("s3://models/irsa")

    assert p.tree(model) == {"a.bin": b"weights"}
    (role_session,) = assumed[before:]
    assert (role_session.role_arn, role_session.session_name) == (role, "node-a")
    s3 = p.sources["s3"]
    (a_bin,) = (await s3.resolve(parse("s3://models/irsa"), None)).files
    loc = await s3.locate(a_bin, None)
    assert f"X-Amz-Credential={role_session.access_key_id}%2F" in loc.url
    assert "X-Amz-Security-Token=" in loc.url


@pytest.mark.slow
async def test_listing_pages_single_object_and_empty_prefix(
    moto_s3: S3Endpoint, pipeline: PipelineFactory, no_aws_env: None
) -> None:
    files = {f"part-{i:02d}.bin": os.urandom(100 + i) for i in range(7)}
    upload_model(moto_s3.client(), moto_s3.bucket, "m/v1", files)
    upload_model(moto_s3.client(), moto_s3.bucket, "m/v10", {"other.bin": b"not v1"})
    p = await pipeline(sources=settings(moto_s3))
    s3 = p.sources["s3"]
    assert isinstance(s3, S3Source)
    s3.page_size = 3

    model = await p.pull("s3://models/m/v1", credentials=keys(moto_s3))
    assert p.tree(model) == files, "pages of 3 keys, and v10 is not under v1/"

    one = await p.pull("s3://models/m/v1/part-03.bin", credentials=keys(moto_s3))
    assert p.tree(one) == {"part-03.bin": files["part-03.bin"]}

    with pytest.raises(SourceNotFound, match="no objects"):
        await s3.resolve(parse("s3://models/m/v2"), keys(moto_s3))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["../escape.bin"], "'..'"),
        (["x//escape.bin"], "empty path segment"),
        (["escape.bin", "escape.bin/inner.bin"], "both a file and a directory"),
    ],
)
async def test_hostile_keys_refused_and_nothing_written(
    moto_s3: S3Endpoint, pipeline: PipelineFactory, tmp_path: Path, no_aws_env: None,
    names: list[str], expected: str,
) -> None:
    upload_model(moto_s3.client(), moto_s3.bucket, "evil", {n: b"pwned" for n in names})
    p = await pipeline(sources=settings(moto_s3))

    model = await p.pull("s3://models/evil", credentials=keys(moto_s3), ok=False)

    assert model.state == FAILED and model.error is not None
    assert expected in model.error and "s3://models" in model.error
    assert not files_named(tmp_path, "escape.bin") and p.blob_count() == 0


async def test_object_changed_mid_pull_is_refused_and_a_new_etag_is_a_new_tree(
    moto_s3: S3Endpoint, pipeline: PipelineFactory, no_aws_env: None
) -> None:
    client = moto_s3.client()
    upload_model(client, moto_s3.bucket, "m", {"w.bin": os.urandom(300_000), "c.json": b"{}"})
    p = await pipeline(sources=settings(moto_s3), refresh_interval=0.0)
    s3 = p.sources["s3"]
    model = await p.pull("s3://models/m", credentials=keys(moto_s3))
    assert model.manifest is not None
    old_tree, old_revision = model.manifest.tree, model.manifest.revision

    resolved = await s3.resolve(parse("s3://models/m"), keys(moto_s3))
    upload_model(client, moto_s3.bucket, "m", {"w.bin": os.urandom(300_000)})
    weights = next(f for f in resolved.files if f.path == "w.bin")
    with pytest.raises(SourceError, match="changed at the source"):
        await p.fetcher.fetch(s3, weights, keys(moto_s3), lambda n: None, FetchStats())

    await p.puller.ensure(parse("s3://models/m"), credentials=keys(moto_s3))
    assert model.task is not None
    await model.task
    assert model.manifest.revision != old_revision and model.manifest.tree != old_tree
    assert old_tree in model.manifest.previous
    current = client.get_object(Bucket=moto_s3.bucket, Key="m/w.bin")["Body"].read()
    assert p.tree(model)["w.bin"] == current


async def test_addressing_styles(moto_s3: S3Endpoint, no_aws_env: None) -> None:
    upload_model(moto_s3.client(), moto_s3.bucket, "m", {"a.bin": b"a"})
    host = moto_s3.url.split("://", 1)[1]
    path_style = source(moto_s3, "path")
    virtual = source(S3Endpoint(f"http://localhost:{host.split(':')[1]}", "test", "test"),
                     "virtual")
    try:
        resolved = await path_style.resolve(parse("s3://models/m"), keys(moto_s3))
        loc = await path_style.locate(resolved.files[0], keys(moto_s3))
        assert loc.url.startswith(f"http://{host}/models/m/a.bin?")
        assert "X-Amz-Signature=" in loc.url and "X-Amz-Credential=test%2F" in loc.url

        vloc = await virtual.locate(resolved.files[0], keys(moto_s3))
        assert vloc.url.startswith(f"http://models.localhost:{host.split(':')[1]}/m/a.bin?")
        with pytest.raises(TransientError, match=r"cannot resolve host models\.localhost"):
            await virtual.resolve(parse("s3://models/m"), keys(moto_s3))
    finally:
        await path_style.close()
        await virtual.close()


@pytest.mark.slow
async def test_virtual_hosted_addressing_against_seaweedfs(
    seaweedfs: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    """Virtual-hosted addressing for real. The agent runs where ``models.s3.test`` (the
    bucket under SeaweedFS's domain) resolves to loopback, and may reach that host alone: the
    listing, the checksums and the ranged GETs all went to the bucket's own name, signed for
    it, or the pull would have been refused. At debug level, no signature reaches its log."""
    files = {"config.json": b"{}", "w.safetensors": os.urandom(3 * MIB)}
    upload_model(seaweedfs.client(), seaweedfs.bucket, s3_prefix, files,
                 checksum_sha256=["w.safetensors"])
    port = seaweedfs.url.rsplit(":", 1)[1]
    bucket_host = f"{seaweedfs.bucket}.{S3_DOMAIN}"
    config = f"sources:\n  s3Endpoint: http://{S3_DOMAIN}:{port}\n  s3Addressing: virtual\n"
    with AgentProcess(tmp_path / "store", env=keys(seaweedfs), allow_hosts=(bucket_host,),
                      config=config, hosts={bucket_host: "127.0.0.1"}) as agent:
        async with AgentClient(agent.url, agent.token) as client:
            started = await client.ensure(f"s3://models/{s3_prefix}")
            model: dict[str, Any] = await client.model(started["key"], wait=60)
    assert model["state"] == "ready", model["error"]
    published = [d for d in (agent.store / "models" / model["key"]).iterdir()
                 if d.name.startswith("t-")]
    assert len(published) == 1 and read_tree(published[0]) == files
    assert agent.proc is not None
    log = agent.proc.log_path.read_text()
    assert '"level": "debug"' in log
    assert "Signature" not in log and seaweedfs.secret_key not in log


@pytest.mark.slow
async def test_unsigned_when_no_credentials_exist(
    moto_s3: S3Endpoint, pipeline: PipelineFactory, no_aws_env: None
) -> None:
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key="public/a.bin", Body=b"public",
                                ACL="public-read")
    p = await pipeline(sources=settings(moto_s3))
    s3 = p.sources["s3"]
    resolved = await s3.resolve(parse("s3://models/public"), None)
    loc = await s3.locate(resolved.files[0], None)
    assert "X-Amz-Signature" not in loc.url
    model = await p.pull("s3://models/public")
    assert p.tree(model) == {"a.bin": b"public"}


@pytest.mark.slow
async def test_real_agent_uses_the_aws_environment(
    seaweedfs: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    files = {"config.json": b"{}", "w.safetensors": os.urandom(2 * MIB)}
    upload_model(seaweedfs.client(), seaweedfs.bucket, s3_prefix, files,
                 checksum_sha256=["w.safetensors"])
    env: Mapping[str, str] = seaweedfs.env()
    with AgentProcess(tmp_path / "store", env=env) as agent:
        async with AgentClient(agent.url, agent.token) as client:
            started = await client.ensure(f"s3://models/{s3_prefix}")
            model: dict[str, Any] = await client.model(started["key"], wait=60)
    assert model["state"] == "ready", model["error"]
    tree = agent.store / "models" / model["key"]
    published = [d for d in tree.iterdir() if d.name.startswith("t-")]
    assert len(published) == 1 and read_tree(published[0]) == files
    sha = {f["path"]: f.get("sha256") for f in model["files"]}
    assert sha["w.safetensors"] == hashlib.sha256(files["w.safetensors"]).hexdigest()

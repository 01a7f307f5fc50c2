"""S3 servers with boto3: moto for speed, SeaweedFS for real signatures."""

from __future__ import annotations

import base64
import hashlib

import botocore.exceptions
import pytest

from tests.servers.net import fetch
from tests.servers.s3 import S3Endpoint, sample_model, upload_model

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def check_model(endpoint: S3Endpoint, prefix: str) -> None:
    files = sample_model()
    client = endpoint.client()
    up = upload_model(
        client, endpoint.bucket, prefix, files, multipart={SHARD1}, checksum_sha256={SHARD2}
    )
    assert up[SHARD1].multipart and up[SHARD1].etag.endswith("-2")
    assert up[SHARD2].sha256 == hashlib.sha256(files[SHARD2]).hexdigest()

    listed = client.list_objects_v2(Bucket=endpoint.bucket, Prefix=f"{prefix}/")["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {
        f"{prefix}/{p}": len(d) for p, d in files.items()
    }
    head = client.head_object(
        Bucket=endpoint.bucket, Key=f"{prefix}/{SHARD2}", ChecksumMode="ENABLED"
    )
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == up[SHARD2].sha256
    part = client.get_object(Bucket=endpoint.bucket, Key=f"{prefix}/{SHARD1}", Range="bytes=5-9")
    assert part["ContentRange"] == f"bytes 5-9/{len(files[SHARD1])}"
    assert part["Body"].read() == files[SHARD1][5:10]


@pytest.mark.slow
def test_moto(moto_s3: S3Endpoint) -> None:
    check_model(moto_s3, "llama/v1")


def test_moto_is_reset_between_tests(moto_s3: S3Endpoint) -> None:
    assert moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket)["KeyCount"] == 0


@pytest.mark.slow
def test_seaweedfs_checks_signatures(seaweedfs: S3Endpoint, s3_prefix: str) -> None:
    check_model(seaweedfs, s3_prefix)
    with pytest.raises(botocore.exceptions.ClientError) as wrong_secret:
        seaweedfs.client(secret_key="wrong").list_objects_v2(Bucket=seaweedfs.bucket)
    assert wrong_secret.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(botocore.exceptions.ClientError) as wrong_key:
        seaweedfs.client(access_key="nobody").list_objects_v2(Bucket=seaweedfs.bucket)
    assert wrong_key.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert fetch(f"{seaweedfs.url}/{seaweedfs.bucket}/{s3_prefix}/config.json").status == 403

    url = seaweedfs.client().generate_presigned_url(
        "get_object", Params={"Bucket": seaweedfs.bucket, "Key": f"{s3_prefix}/config.json"}
    )
    assert fetch(url).body == sample_model()["config.json"]
    assert fetch(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status == 403

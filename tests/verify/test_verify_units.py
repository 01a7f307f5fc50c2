"""The pieces around the check: the policy in the key (agent, webhook and pod directory
agree), policies from a ConfigMap and from the config file, the Sigstore method offline, and
the gate every way of serving asks."""

from __future__ import annotations

import glob
import json
from dataclasses import replace
from pathlib import Path

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cluster.pods import models_of
from agent.config import load_config
from agent.store.trees import FileEntry, Manifest, Verification
from agent.verify import require_verified, verified_under
from agent.verify.policy import from_config_map, make_policy
from agent.verify.signature import verify_files
from common.errors import InvalidInput, InvalidReference, PolicyError, VerificationFailed
from common.reference import parse, policy_scope
from tests.verify.signing import KeyPair, Signer
from webhook.plan import Plan, plan
from webhook.settings import PlanSettings

URI = "hf://org/model@main"
SIGSTORE_STORE = glob.glob(str(Path(blake3.__file__).parents[1] / "sigstore" / "_store" /
                               "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"))


# --- the key -------------------------------------------------------------------------------


def test_the_policy_is_part_of_the_key() -> None:
    plain, signed = parse(URI), parse(URI, verify="release")
    assert plain.key != signed.key != parse(URI, verify="other").key
    assert signed.key != parse(URI, verify=policy_scope("ml", "release")).key
    assert signed.with_revision("a" * 40).verify == "release"
    assert signed.canonical == f"{URI}\n\0verify=release"


@given(st.lists(st.text(alphabet="abcz*.=:-/", min_size=1, max_size=12), max_size=3),
       st.sampled_from(["p", "release", "a.b"]))
def test_no_include_glob_spells_a_policy(globs: list[str], name: str) -> None:
    try:
        with_globs = parse(URI, [*globs, f"verify={name}"])
    except InvalidReference:
        return
    assert with_globs.key != parse(URI, globs, name).key


@pytest.mark.parametrize("namespace, name, problem", [
    (None, "Release", "is not a ConfigMap name"),
    (None, "", "is empty"),
    ("ml", "a/b", "is not a ConfigMap name"),
    ("Bad_NS", "p", "is not a valid namespace name"),
])
def test_policy_scope_is_checked(namespace: str | None, name: str, problem: str) -> None:
    with pytest.raises(InvalidReference, match=problem):
        policy_scope(namespace, name)


def test_webhook_agent_and_pod_directory_name_the_same_directory() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "ml", "labels": {"modelcache.io/inject": "true"},
                        "annotations": {"modelcache.io/model": URI,
                                        "modelcache.io/verify": "release"}},
           "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]}}
    planned = plan(pod, {}, PlanSettings(), "ml")
    assert isinstance(planned, Plan)
    expected = parse(URI, verify=policy_scope("ml", "release")).key
    injected = json.loads(planned.pod["metadata"]["annotations"]["modelcache.io/injected"])
    assert injected["key"] == expected
    volumes = {v["name"]: v for v in planned.pod["spec"]["volumes"]}
    assert volumes["modelcache-store"]["hostPath"]["path"].endswith(f"/models/{expected}")
    assert models_of(pod) == {expected}, "the agent holds the pod's own, verified, model"
    init = planned.pod["spec"]["initContainers"][0]
    assert init["command"][-2:] == ["--verify", "release"]
    assert {"name": "MODELCACHE_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in init["env"]


# --- policies ------------------------------------------------------------------------------


def test_configmap_policies(keys: dict[str, KeyPair]) -> None:
    pem = keys["release"].public.read_text()
    policy = from_config_map("ml/release", {"publicKey": pem, "signature": "sig/model.sig"})
    assert (policy.method, policy.signature, policy.scope) == (
        "publicKey", "sig/model.sig", "ml/release")
    assert policy.digest != from_config_map("ml/release", {"publicKey": pem}).digest
    cases = {
        "ConfigMap must hold exactly one of publicKey, certificateChain or sigstore.* "
        "(found publicKey, certificateChain)": {"publicKey": pem, "certificateChain": pem},
        "(found none)": {"signature": "model.sig"},
        "unknown key(s) publickey": {"publickey": pem},
        "sigstore.trustRoot is required": {"sigstore.identity": "a", "sigstore.issuer": "b"},
        "publicKey is not a PEM public key": {"publicKey": "hello"},
        "certificateChain is not a PEM bundle of certificates": {"certificateChain": "no PEM"},
        "signature path '../model.sig' contains '..'": {"publicKey": pem,
                                                         "signature": "../model.sig"},
        "sigstore.trustRoot is not a Sigstore client trust config": {
            "sigstore.identity": "a", "sigstore.issuer": "b", "sigstore.trustRoot": "{}"},
        "sigstore needs both an identity and an issuer": {
            "sigstore.identity": " ", "sigstore.issuer": "b", "sigstore.trustRoot": "{}"},
    }
    for problem, data in cases.items():
        with pytest.raises(PolicyError) as e:
            from_config_map("ml/p", data)
        assert str(e.value).startswith("verify policy 'ml/p': "), e.value
        assert problem in str(e.value), e.value


def test_an_rsa_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key() \
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(PolicyError, match="must be an elliptic curve key"):
        make_policy("p", "publicKey", pem)


def test_config_file_policies(tmp_path: Path) -> None:
    def load(text: str) -> dict[str, object]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return load_config(path)

    ok = load("verifyPolicies: {release: {publicKey: /k.pub}, ci: {sigstore: {identity: a, "
              "issuer: b, trustRoot: /t.json}}}\nmodels: [{uri: 'hf://o/m', verify: release}]\n")
    assert set(ok["verifyPolicies"]) == {"release", "ci"}  # type: ignore[arg-type]
    for text, problem in [
        ("verifyPolicies: {p: {publicKey: /a, certificateChain: /b}}",
         "verifyPolicies/p: needs exactly one of publicKey, certificateChain, sigstore"),
        ("verifyPolicies: {p: {}}", "(has none)"),
        ("verifyPolicies: {Bad_Name: {publicKey: /a}}", "is not a ConfigMap name"),
        ("verifyPolicies: {p: {publicKey: relative.pub}}", "verifyPolicies/p/publicKey"),
        ("models: [{uri: 'hf://o/m', verify: p}]", "models/0/verify: no policy 'p'"),
    ]:
        with pytest.raises(InvalidInput) as e:
            load(text)
        assert problem in str(e.value), e.value


@pytest.mark.skipif(not SIGSTORE_STORE, reason="sigstore ships its public trust root")
def test_a_sigstore_policy_is_checked_offline(tmp_path: Path, signer: Signer,
                                              keys: dict[str, KeyPair]) -> None:
    """The trust root is given (here: the public one sigstore ships, assembled into a
    client trust config): nothing is fetched. A bundle signed by a bare key carries no
    Sigstore certificate, so it cannot pass under a Sigstore identity."""
    store = Path(SIGSTORE_STORE[0])
    trust = json.dumps({
        "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
        "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
        "signingConfig": json.loads((store / "signing_config.v0.2.json").read_text())})
    policy = make_policy("ci", "sigstore", trust.encode(), identity="ci@example.com",
                         issuer="https://accounts.example.com")
    files, blobs = blob_files(signer.with_key({"a.txt": b"a"}, keys["release"]), tmp_path)
    with pytest.raises(VerificationFailed) as e:
        verify_files(policy, files, lambda d: blobs / d, tmp_path / "work")
    assert str(e.value) == ("verify policy 'ci': the signature does not verify: expected "
                            "certificate in bundle")


def blob_files(files: dict[str, bytes], where: Path) -> tuple[list[FileEntry], Path]:
    blobs = where / "blobs"
    blobs.mkdir()
    entries = []
    for path, data in files.items():
        digest = blake3.blake3(data).hexdigest()
        (blobs / digest).write_bytes(data)
        entries.append(FileEntry(path, len(data), digest))
    return entries, blobs


def test_a_blake3_signature_is_checked_from_the_blob_names_alone(
        tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """Signed with model-signing's blake3 (its Python API): every digest it needs is a blob's
    name, so the check reads no blob (each one is removed before it runs)."""
    from model_signing import hashing, signing

    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(b"w" * 100_000)
    (model / "c.json").write_text("{}")
    config = hashing.Config().use_file_serialization(hashing_algorithm="blake3")
    config.set_ignored_paths(paths=["model.sig"])
    signing.Config().use_elliptic_key_signer(private_key=keys["release"].private) \
        .set_hashing_config(config).sign(model, model / "model.sig")
    files, blobs = blob_files({p.name: p.read_bytes() for p in model.iterdir()}, tmp_path)
    for f in files:
        if f.path != "model.sig":
            (blobs / f.blake3).unlink()
    policy = make_policy("release", "publicKey", keys["release"].public.read_bytes())
    check, checked = verify_files(policy, files, lambda d: blobs / d, tmp_path / "work")
    assert check.policy == "release" and all(f.sha256 is None for f in checked)


# --- the gate ------------------------------------------------------------------------------


def test_the_gate_fails_closed() -> None:
    check = Verification("ml/p", "key sha256:00", 1.0, "publicKey", "d", "t-0000000000000000")
    manifest = Manifest(key="k", uri=URI, revision="r", tree="t-0000000000000000", files=(),
                        verify="ml/p", verified=check)
    assert verified_under(manifest, "ml/p") and verified_under(None, "")
    for bad, policy in [(manifest, "ml/q"), (replace(manifest, verified=None), "ml/p"),
                        (replace(manifest, tree="t-1111111111111111"), "ml/p"),
                        (replace(manifest, verify=""), "ml/p"), (None, "ml/p")]:
        assert not verified_under(bad, policy)
        with pytest.raises(VerificationFailed, match=r"^verify policy 'ml/"):
            require_verified(bad, policy)
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest

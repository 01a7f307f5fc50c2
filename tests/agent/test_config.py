"""The config file's ``sources`` section: applied to the sources the agent builds, ahead of
the environment variables of each ecosystem, and refused with the field named when wrong;
``caFile``: checked at start-up, trusted on top of the system's CAs."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest
import trustme

from agent.config import add_agent_flags, agent_settings
from agent.egress import Egress
from agent.settings import AgentSettings
from agent.sources.catalog import build_sources
from agent.sources.registry import ModelRegistrySource
from agent.sources.s3 import S3Source
from common.errors import InvalidInput


def settings_from(tmp_path: Path, config: str) -> AgentSettings:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    p = argparse.ArgumentParser()
    add_agent_flags(p)
    args = p.parse_args(["--standalone", "--store", str(tmp_path / "store"),
                         "--config", str(path)])
    return agent_settings(args)


def test_sources_section_reaches_the_sources(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://from-env.example")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env.example:9000")
    settings = settings_from(tmp_path, """
sources:
  hfEndpoint: https://hf-mirror.internal
  s3Addressing: virtual
  s3Region: eu-west-1
  modelRegistry: model-registry.kubeflow:8443
  modelRegistryScheme: https
""")
    s = settings.sources
    assert s.hf_endpoint == "https://hf-mirror.internal", "the file wins over HF_ENDPOINT"
    assert s.s3_endpoint == "http://from-env.example:9000", "the environment fills the rest"
    assert (s.s3_addressing, s.s3_region) == ("virtual", "eu-west-1")
    sources = build_sources(Egress(settings.egress), settings)
    s3 = sources["s3"]
    registry = sources["model-registry"]
    assert isinstance(s3, S3Source) and s3.addressing == "virtual"
    assert isinstance(registry, ModelRegistrySource) and registry.scheme == "https"


def test_without_a_sources_section_the_environment_and_defaults_apply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://from-env.example")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    s = settings_from(tmp_path, "refreshInterval: 60\n").sources
    assert s.hf_endpoint == "https://from-env.example"
    assert (s.s3_endpoint, s.s3_addressing, s.model_registry_scheme) == (None, "auto", "http")


@pytest.mark.parametrize(("config", "named"), [
    ("sources: {s3Addressing: dns}\n", "sources/s3Addressing"),
    ("sources: {modelRegistryScheme: grpc}\n", "sources/modelRegistryScheme"),
    ("sources: {hfEndpoint: hf-mirror.internal}\n", "sources/hfEndpoint"),
    ("sources: {hfToken: x}\n", "hfToken"),
])
def test_a_bad_sources_section_is_refused_naming_the_field(tmp_path: Path, config: str,
                                                           named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        settings_from(tmp_path, config)


def test_ca_file_reaches_every_tls_connection(tmp_path: Path) -> None:
    """caFile (or --ca-file) is checked at start-up and trusted on top of the system's."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = settings_from(tmp_path, f"caFile: {tmp_path / 'ca.pem'}\n")
    assert settings.egress.ca_file == tmp_path / "ca.pem"
    egress = Egress(settings.egress)
    subjects = [c["subject"] for c in egress.tls.get_ca_certs()]
    assert any("trustme" in str(s) for s in subjects), "the private CA is trusted"
    system = ssl.create_default_context().get_ca_certs()
    assert len(subjects) == len(system) + 1, "the system's CAs are kept"


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    (b"not a certificate\n", "not a PEM bundle of CA certificates"),
])
def test_a_bad_ca_file_is_refused_at_start_up(tmp_path: Path, content: bytes | None,
                                              says: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInput, match=f"caFile {path}: {says}"):
        settings_from(tmp_path, f"caFile: {path}\n")
    with pytest.raises(InvalidInput, match="caFile"):
        settings_from(tmp_path, "caFile: relative/ca.pem\n")


def test_a_bad_allow_host_is_refused_at_start_up(tmp_path: Path) -> None:
    """allowHosts (and --allow-host) in the syntax the webhook reads too (common/hosts.py)."""
    assert settings_from(tmp_path, "allowHosts: ['*.corp', '[::1]:9000']\n").egress.allow_hosts \
        == ("*.corp", "[::1]:9000")
    with pytest.raises(InvalidInput, match=r"allow-host entry 'mirror corp' is not HOST\[:PORT\]"):
        settings_from(tmp_path, "allowHosts: ['mirror corp']\n")

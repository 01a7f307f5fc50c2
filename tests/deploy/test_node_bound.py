"""deploy/components/node-bound: the ValidatingAdmissionPolicy that holds each agent to its
own node (what RBAC cannot). Its objects validate strictly, and its CEL, evaluated by
cel-python as the apiserver would (matchConditions, then variables in order, then each
validation), admits the agent's own writes and refuses the rest."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest

from tests.deploy import render, schemas
from tests.deploy.render import DEPLOY

COMPONENT = DEPLOY / "components" / "node-bound"
AGENT = "system:serviceaccount:modelcache:modelcache-agent"
NODE_NAME = "authentication.kubernetes.io/node-name"


def policy() -> dict[str, Any]:
    [doc] = [d for d in render.kustomize(COMPONENT) if d["kind"] == "ValidatingAdmissionPolicy"]
    return doc


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_the_component_validates(version: str) -> None:
    docs = render.kustomize(COMPONENT)
    assert {d["kind"] for d in docs} == {"ValidatingAdmissionPolicy",
                                         "ValidatingAdmissionPolicyBinding"}
    for doc in docs:
        schemas.validate(doc, version, {})


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression)).evaluate(activation)


def admitted(user: str, node: str | None, resource: str, name: str,
             obj: dict[str, Any], old: dict[str, Any] | None) -> bool:
    spec = policy()["spec"]
    extra = {NODE_NAME: [node]} if node else {}
    activation: dict[str, Any] = {
        "request": celpy.json_to_cel({"userInfo": {"username": user, "extra": extra},
                                      "name": name, "resource": {"resource": resource},
                                      "operation": "CREATE" if old is None else "UPDATE"}),
        "object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old)}
    if not all(evaluate(m["expression"], activation) for m in spec["matchConditions"]):
        return True  # not the agent: the policy does not apply
    variables: dict[str, Any] = {}
    for v in spec["variables"]:
        activation["variables"] = celpy.json_to_cel(variables)
        variables[v["name"]] = evaluate(v["expression"], activation)
    activation["variables"] = celpy.json_to_cel(variables)
    return all(bool(evaluate(v["expression"], activation)) for v in spec["validations"])


NODE = {"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "pool": "gpu",
                                              "modelcache.io/m-0123456789abcdef": "ready"}},
        "spec": {"podCIDR": "10.0.0.0/24"}}


def changed(labels: dict[str, str | None]) -> dict[str, Any]:
    out = copy.deepcopy(NODE)
    for key, value in labels.items():
        if value is None:
            out["metadata"]["labels"].pop(key)
        else:
            out["metadata"]["labels"][key] = value
    return out


def test_an_agent_changes_only_its_own_nodes_model_labels() -> None:
    own = changed({"modelcache.io/m-fedcba9876543210": "ready"})
    assert admitted(AGENT, "n1", "nodes", "n1", own, NODE)
    assert admitted(AGENT, "n1", "nodes", "n1", changed(
        {"modelcache.io/m-0123456789abcdef": None}), NODE)
    assert not admitted(AGENT, "n2", "nodes", "n1", own, NODE), "another node's agent"
    assert not admitted(AGENT, None, "nodes", "n1", own, NODE), "a token without a node"
    assert not admitted(AGENT, "n1", "nodes", "n1", changed({"pool": "cpu"}), NODE)
    assert not admitted(AGENT, "n1", "nodes", "n1", changed({"pool": None}), NODE)
    tainted = copy.deepcopy(NODE)
    tainted["spec"]["taints"] = [{"key": "k", "effect": "NoSchedule"}]
    assert not admitted(AGENT, "n1", "nodes", "n1", tainted, NODE)
    # anyone else is not matched: kubelet and admins change what they like
    assert admitted("system:node:n1", "n1", "nodes", "n1", changed({"pool": "cpu"}), NODE)


def test_an_agent_writes_only_its_own_node_cache() -> None:
    cache = {"metadata": {"name": "n1"}, "status": {"models": []}}
    assert admitted(AGENT, "n1", "nodecaches", "n1", cache, None)  # create
    assert admitted(AGENT, "n1", "nodecaches", "n1", cache, cache)  # update
    other = {"metadata": {"name": "n2"}, "status": {"models": []}}
    assert not admitted(AGENT, "n1", "nodecaches", "n2", other, None)
    assert not admitted(AGENT, "n1", "nodecaches", "n2", other, other)

"""deploy/README.md lists every RBAC verb with its reason, and nothing the roles lack:
the table and the rendered Roles and ClusterRoles agree both ways, and no rule uses a
wildcard."""

from __future__ import annotations

import re

import pytest

from tests.deploy import render
from tests.deploy.render import DEPLOY, INSTALLABLE

Grant = tuple[str, str, str, str, str]  # role, group, resource, verb, restriction


def readme_grants() -> set[Grant]:
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## RBAC", 1)[1]
    out: set[Grant] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("identity", "---"):
            continue
        _, role, group, resource, verbs, restricted, why = cells
        assert len(why) > 20, f"say why: {line}"
        for verb in verbs.split(", "):
            out.add((role, group, resource, verb, restricted))
    return out


def rendered_grants() -> set[Grant]:
    out: set[Grant] = set()
    for name in INSTALLABLE:
        for d in render.render(name):
            if d["kind"] not in ("Role", "ClusterRole"):
                continue
            role = f"{d['kind']} {d['metadata']['name']}"
            for rule in d["rules"]:
                names = ", ".join(rule.get("resourceNames", []))
                restricted = names or (f"namespace {d['metadata']['namespace']}"
                                       if d["kind"] == "Role" else "–")
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            out.add((role, group or "core", resource, verb, restricted))
    return out


def test_no_wildcards() -> None:
    for role, group, resource, verb, _ in rendered_grants():
        assert "*" not in (group, resource, verb), role


@pytest.mark.parametrize("direction", ["every rendered grant is explained",
                                       "every explained grant exists"])
def test_readme_table_matches_the_roles(direction: str) -> None:
    readme, rendered = readme_grants(), rendered_grants()
    if direction.startswith("every rendered"):
        assert rendered - readme == set(), "add these to deploy/README.md's RBAC table"
    else:
        assert readme - rendered == set(), "deploy/README.md lists grants no role has"


def test_identities_are_the_service_accounts() -> None:
    names = {re.sub(r"^(Cluster)?Role ", "", g[0]) for g in rendered_grants()}
    # each role is its identity's, and the one the namespaces bind themselves is named so
    assert names == {"modelcache-agent", "modelcache-agent-secrets", "modelcache-webhook",
                     "modelcache-webhook-certs"}

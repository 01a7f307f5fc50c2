"""Who a request is, and what it may do: bearer tokens, TokenReview, RBAC, SubjectAccessReview.

Tokens are programmed by the test (token -> user, groups, audiences, extra). Authorization
follows RBAC semantics: ``PolicyRule``s granted to users, groups or service accounts, cluster
wide or in one namespace, loadable from ClusterRole/Role/ClusterRoleBinding/RoleBinding
manifests. The same rules answer SubjectAccessReviews and, when enforced, the server's own
requests (members of ``system:masters`` may do anything, as on a real cluster).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict, hash=False)
    #: audiences the token is valid for
    audiences: tuple[str, ...] = (API_AUDIENCE,)

    def as_user_info(self) -> JSON:
        info: JSON = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = {k: list(v) for k, v in self.extra.items()}
        return info


@dataclass(frozen=True)
class Rule:
    verbs: frozenset[str]
    api_groups: frozenset[str]
    resources: frozenset[str]
    resource_names: frozenset[str] = frozenset()
    non_resource_urls: frozenset[str] = frozenset()

    def allows(self, attrs: JSON) -> bool:
        if "nonResourceAttributes" in attrs:
            nra = attrs["nonResourceAttributes"]
            return _has(self.verbs, nra.get("verb", "")) and any(
                u == "*" or u == nra.get("path") or (u.endswith("*") and
                                                      nra.get("path", "").startswith(u[:-1]))
                for u in self.non_resource_urls
            )
        ra = attrs.get("resourceAttributes") or {}
        resource = ra.get("resource", "")
        if ra.get("subresource"):
            resource = f"{resource}/{ra['subresource']}"
        return bool(
            _has(self.verbs, ra.get("verb", ""))
            and _has(self.api_groups, ra.get("group", ""))
            and (_has(self.resources, resource)
                 or (f"*/{ra.get('subresource')}" in self.resources and ra.get("subresource")))
            and (not self.resource_names or ra.get("name", "") in self.resource_names)
        )


def _has(allowed: frozenset[str], value: str) -> bool:
    return "*" in allowed or value in allowed


@dataclass(frozen=True)
class Grant:
    users: frozenset[str]
    groups: frozenset[str]
    namespace: str | None  # None: cluster wide
    rule: Rule


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


class Auth:
    """Tokens and RBAC of the fake cluster."""

    def __init__(self) -> None:
        self.tokens: dict[str, User] = {}
        self.grants: list[Grant] = []
        self.api_audiences: tuple[str, ...] = (API_AUDIENCE,)

    # --- tokens --------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        user: str,
        groups: Iterable[str] = (),
        *,
        uid: str = "",
        extra: dict[str, list[str]] | None = None,
        audiences: Iterable[str] | None = None,
    ) -> User:
        groups = tuple(groups)
        if "system:authenticated" not in groups:
            groups += ("system:authenticated",)
        info = User(user, uid, groups, dict(extra or {}),
                    tuple(audiences) if audiences is not None else self.api_audiences)
        self.tokens[token] = info
        return info

    def add_service_account_token(
        self,
        token: str,
        namespace: str,
        name: str,
        *,
        audiences: Iterable[str] | None = None,
        pod: tuple[str, str] | None = None,
        node: str | None = None,
    ) -> User:
        """A projected service-account token, optionally bound to a pod (name, uid) on a node."""
        extra: dict[str, list[str]] = {}
        if pod is not None:
            extra["authentication.kubernetes.io/pod-name"] = [pod[0]]
            extra["authentication.kubernetes.io/pod-uid"] = [pod[1]]
        if node is not None:
            extra["authentication.kubernetes.io/node-name"] = [node]
        return self.add_token(
            token, service_account_user(namespace, name),
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
            uid=f"uid-sa-{namespace}-{name}", extra=extra, audiences=audiences,
        )

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    def authenticate(self, authorization: str | None) -> User | None:
        """The user of an ``Authorization: Bearer`` header valid for the API's audience."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        user = self.tokens.get(authorization[len("Bearer "):].strip())
        if user is None or not set(user.audiences) & set(self.api_audiences):
            return None
        return user

    def token_review(self, review: JSON) -> JSON:
        spec = review.get("spec") or {}
        wanted = tuple(spec.get("audiences") or ()) or self.api_audiences
        user = self.tokens.get(spec.get("token", ""))
        status: JSON = {"user": {}}
        if user is None:
            status["error"] = "[invalid bearer token, service account token has been invalidated]"
        else:
            common = [a for a in wanted if a in user.audiences]
            if not common:
                status["error"] = (
                    f"[invalid bearer token, token audiences {list(user.audiences)} is invalid "
                    f"for the target audiences {list(wanted)}]"
                )
            else:
                status = {"authenticated": True, "user": user.as_user_info(), "audiences": common}
        return {**review, "status": status}

    # --- RBAC ----------------------------------------------------------------------------

    def allow(
        self,
        *,
        verbs: Iterable[str],
        resources: Iterable[str] = (),
        api_groups: Iterable[str] = ("",),
        users: Iterable[str] = (),
        groups: Iterable[str] = (),
        namespace: str | None = None,
        resource_names: Iterable[str] = (),
        non_resource_urls: Iterable[str] = (),
    ) -> None:
        """Grant one RBAC rule to users and/or groups (cluster wide unless ``namespace``)."""
        self.grants.append(Grant(
            frozenset(users), frozenset(groups), namespace,
            Rule(frozenset(verbs), frozenset(api_groups), frozenset(resources),
                 frozenset(resource_names), frozenset(non_resource_urls)),
        ))

    def load_rbac(self, docs: Iterable[JSON]) -> None:
        """Grant what RBAC manifests (roles and their bindings) grant."""
        docs = [d for d in docs if d]
        roles = {
            (d["kind"], (d["metadata"].get("namespace") if d["kind"] == "Role" else None),
             d["metadata"]["name"]): d.get("rules") or []
            for d in docs if d.get("kind") in ("ClusterRole", "Role")
        }
        for binding in docs:
            if binding.get("kind") not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            ref = binding["roleRef"]
            rules = roles.get((ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"]))
            if rules is None:
                continue  # a binding to a role that does not exist grants nothing
            users, groups = [], []
            for s in binding.get("subjects") or []:
                if s["kind"] == "ServiceAccount":
                    users.append(service_account_user(s.get("namespace") or ns or "", s["name"]))
                elif s["kind"] == "User":
                    users.append(s["name"])
                elif s["kind"] == "Group":
                    groups.append(s["name"])
            for r in rules:
                self.allow(
                    verbs=r.get("verbs") or [], resources=r.get("resources") or [],
                    api_groups=r.get("apiGroups") or [], users=users, groups=groups,
                    namespace=ns, resource_names=r.get("resourceNames") or [],
                    non_resource_urls=r.get("nonResourceURLs") or [],
                )

    def authorized(self, user: str, groups: Iterable[str], attrs: JSON) -> bool:
        groups = set(groups)
        if "system:masters" in groups:
            return True
        ns = (attrs.get("resourceAttributes") or {}).get("namespace", "")
        for g in self.grants:
            if user not in g.users and not (groups & g.groups):
                continue
            if g.namespace is not None and (g.namespace != ns or "nonResourceAttributes" in attrs):
                continue
            if g.rule.allows(attrs):
                return True
        return False

    def subject_access_review(self, review: JSON) -> JSON:
        spec = review.get("spec") or {}
        allowed = self.authorized(spec.get("user", ""), spec.get("groups") or [], spec)
        status: JSON = {"allowed": allowed}
        if allowed:
            status["reason"] = "allowed by the fake cluster's RBAC rules"
        return {**review, "status": status}

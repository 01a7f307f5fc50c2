"""The gate: does a published model carry a passing verification under a policy?

Every way of handing a model to a pod asks this one question, and fails closed: the admin
API's ``verified`` field, the init container (the manifest its side mount shows), and the
CSI node service's publish.
"""

from __future__ import annotations

from agent.store.trees import Manifest
from common.errors import VerificationFailed


def verified_under(manifest: Manifest | None, policy: str) -> bool:
    """Whether ``manifest`` carries a passing check under the policy scope ``policy``
    (``NAME``, or ``NAMESPACE/NAME`` in a cluster) for its current tree. No policy: True."""
    if not policy:
        return True
    if manifest is None or manifest.verify != policy:
        return False
    check = manifest.verified
    return check is not None and check.policy == policy and check.tree == manifest.tree


def require_verified(manifest: Manifest | None, policy: str) -> None:
    """Raise :class:`VerificationFailed` unless :func:`verified_under` holds."""
    if verified_under(manifest, policy):
        return
    if manifest is None:
        raise VerificationFailed(f"verify policy {policy!r}: the model is not published")
    raise VerificationFailed(f"verify policy {policy!r}: model {manifest.key} carries no "
                             "passing signature check under it; refusing to serve it")

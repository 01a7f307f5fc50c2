"""The three patch formats the apiserver accepts as JSON (server-side apply is not served).

- ``application/merge-patch+json`` (RFC 7386): objects merge, ``null`` deletes, lists replace.
- ``application/json-patch+json`` (RFC 6902): a list of operations; a body that is not a list
  is a 400, an operation that cannot apply (failed ``test``, missing path) a 422.
- ``application/strategic-merge-patch+json``: built-in types only (415 for custom
  resources). Maps merge like a merge patch; lists whose Go field declares a merge key
  (containers by ``name``, conditions by ``type``, ...) merge element-wise by that key, primitive
  lists declared ``merge`` (finalizers) take the union; ``$patch: delete|replace`` and
  ``$deleteFromPrimitiveList/<field>`` are honoured; ``$setElementOrder``/``$retainKeys``
  directives are accepted and ignored.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from tests.kubeapi.errors import ApiError, bad_request, unprocessable

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"

#: list fields (by name, wherever they appear) merged element-wise by a key, from the Go
#: struct tags ``patchStrategy:"merge" patchMergeKey:"..."`` of the core types
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "addresses": "type",
    "taints": "key",
    "resourceClaims": "name",
}
#: primitive lists with ``patchStrategy:"merge"`` (union instead of replace)
MERGE_PRIMITIVE = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902, with the apiserver's error codes."""
    if not isinstance(ops, list):
        raise bad_request(
            f"json: cannot unmarshal {type(ops).__name__} into Go value of type jsonpatch.Patch"
        )
    try:
        return jsonpatch.JsonPatch(ops).apply(copy.deepcopy(target))
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        raise unprocessable(str(e)) from e
    except (KeyError, TypeError, ValueError) as e:
        raise bad_request(f"invalid JSON patch: {e}") from e


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch: the patch must be a JSON object")
    return _smp_map(target if isinstance(target, dict) else {}, patch)


def _smp_map(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    if directive is not None:
        raise bad_request(f"strategic merge patch: unknown patch type {directive!r}")
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(out.get(field), list) and isinstance(value, list):
                out[field] = [v for v in out[field] if v not in value]
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                out.pop(key, None)
            else:
                current = out.get(key)
                out[key] = _smp_map(current if isinstance(current, dict) else {}, value)
        elif isinstance(value, list) and key in MERGE_KEYS:
            current = out.get(key)
            out[key] = _smp_list(current if isinstance(current, list) else [], value, key)
        elif isinstance(value, list) and key in MERGE_PRIMITIVE:
            current = out.get(key)
            merged = list(current) if isinstance(current, list) else []
            merged += [v for v in value if v not in merged]
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _smp_list(target: list[Any], patch: list[Any], field: str) -> list[Any]:
    key = MERGE_KEYS[field]
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        return [copy.deepcopy(p) for p in patch if not (isinstance(p, dict) and "$patch" in p)]
    out = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise bad_request(f"map: {item!r} does not contain declared merge key: {key}")
        index = next(
            (i for i, cur in enumerate(out) if isinstance(cur, dict) and cur.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del out[index]
        elif index is None:
            out.append({k: v for k, v in item.items() if v is not None})
        else:
            out[index] = _smp_map(out[index], item)
    return out


def apply(content_type: str, target: Any, body: Any, *, strategic_allowed: bool) -> Any:
    """Apply a patch of the given media type; raise the apiserver's error otherwise."""
    if content_type == MERGE:
        if not isinstance(body, dict):
            raise bad_request("json: cannot unmarshal array into Go value of type map[string]"
                              "interface {}")
        return merge_patch(target, body)
    if content_type == JSON_PATCH:
        return json_patch(target, body)
    if content_type == STRATEGIC and strategic_allowed:
        return strategic_merge_patch(target, body)
    if content_type == APPLY:
        raise ApiError(415, "UnsupportedMediaType", "the fake apiserver does not serve apply")
    raise ApiError(
        415, "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        + ", ".join(accepted(strategic_allowed)),
    )


def accepted(strategic_allowed: bool) -> list[str]:
    types = [JSON_PATCH, MERGE]
    if strategic_allowed:
        types.append(STRATEGIC)
    return [*types, APPLY]

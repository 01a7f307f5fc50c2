"""The JSON patch (step 4 of admission): from the pod as sent to the pod as planned.

RFC 6902 operations. Objects are walked here, so unchanged subtrees cost one C-level
equality check and a missing parent (``/spec/volumes``, ``/spec/initContainers``,
``/metadata/annotations``, ``/spec/affinity``) is added whole; two list shapes the planner
makes are written as plainly as a person would (items appended, one item inserted in
front with the rest changed in place); any other list change is diffed by
``jsonpatch.make_patch``. Keys are escaped per RFC 6901 (``modelcache.io~1injected``).
Values Python holds equal (``1``, ``1.0`` and ``true``) are not told apart; the planner
never turns one into another.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import jsonpatch

Operation = dict[str, Any]


def make(original: Mapping[str, Any], planned: Mapping[str, Any]) -> list[Operation]:
    """The operations that turn ``original`` into ``planned``; empty when they are equal."""
    operations: list[Operation] = []
    _diff(original, planned, "", operations)
    return operations


def _diff(old: Any, new: Any, path: str, out: list[Operation]) -> None:
    if old == new and type(old) is type(new):
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in old:
            if key not in new:
                out.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            if key not in old:
                out.append({"op": "add", "path": f"{path}/{_escape(key)}",
                            "value": copy.deepcopy(value)})
            else:
                _diff(old[key], value, f"{path}/{_escape(key)}", out)
        return
    if isinstance(old, list) and isinstance(new, list):
        if not _diff_list(old, new, path, out):
            for operation in jsonpatch.make_patch(old, new).patch:
                operation["path"] = path + operation["path"]
                if "from" in operation:
                    operation["from"] = path + operation["from"]
                out.append(operation)
        return
    out.append({"op": "replace", "path": path, "value": copy.deepcopy(new)})


def _diff_list(old: list[Any], new: list[Any], path: str, out: list[Operation]) -> bool:
    """The plain shapes: same length (changed in place), appended, or one item in front."""
    if len(new) == len(old):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{path}/{index}", out)
        return True
    extra = len(new) - len(old)
    if extra > 0 and new[: len(old)] == old:
        for index in range(len(old), len(new)):
            out.append({"op": "add", "path": f"{path}/{index}",
                        "value": copy.deepcopy(new[index])})
        return True
    if extra == 1 and old and _same_names(old, new[1:]):
        out.append({"op": "add", "path": f"{path}/0", "value": copy.deepcopy(new[0])})
        for index, (a, b) in enumerate(zip(old, new[1:], strict=True), start=1):
            _diff(a, b, f"{path}/{index}", out)
        return True
    return False


def _same_names(old: list[Any], new: list[Any]) -> bool:
    """Whether two lists hold the same named objects (containers, volumes) in order."""
    return all(
        isinstance(a, Mapping) and isinstance(b, Mapping) and "name" in a
        and a.get("name") == b.get("name")
        for a, b in zip(old, new, strict=True)
    )


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def encode(operations: list[Operation]) -> bytes:
    """The patch as compact JSON bytes (what goes, base64-encoded, into the response)."""
    return json.dumps(operations, separators=(",", ":"), ensure_ascii=False).encode()


def apply(document: Mapping[str, Any], operations: list[Operation]) -> dict[str, Any]:
    """Apply a patch without changing ``document`` (for checks and tests)."""
    patched: dict[str, Any] = jsonpatch.apply_patch(document, operations, in_place=False)
    return patched

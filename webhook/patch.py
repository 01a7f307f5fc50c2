"""The JSON patch (step 4 of admission): from the pod as sent to the pod as planned.

RFC 6902 operations computed by ``jsonpatch.make_patch``; it adds missing parents whole
(``/spec/volumes``, ``/spec/initContainers``, ``/metadata/annotations``, ``/spec/affinity``)
and escapes ``/`` in annotation keys (``modelcache.io~1injected``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jsonpatch

Operation = dict[str, Any]


def make(original: Mapping[str, Any], planned: Mapping[str, Any]) -> list[Operation]:
    """The operations that turn ``original`` into ``planned``; empty when they are equal."""
    if original == planned:
        return []
    operations: list[Operation] = jsonpatch.make_patch(original, planned).patch
    return operations


def encode(operations: list[Operation]) -> bytes:
    """The patch as compact JSON bytes (what goes, base64-encoded, into the response)."""
    return json.dumps(operations, separators=(",", ":"), ensure_ascii=False).encode()


def apply(document: Mapping[str, Any], operations: list[Operation]) -> dict[str, Any]:
    """Apply a patch without changing ``document`` (for checks and tests)."""
    patched: dict[str, Any] = jsonpatch.apply_patch(document, operations, in_place=False)
    return patched

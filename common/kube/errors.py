"""What an apiserver's refusal means, in the project's errors (``common/errors.py``).

404 -> ``NotFound``, 409 -> ``Conflict``, 410 -> :class:`Expired` (list again), 422 ->
:class:`Invalid` (the object, or a JSON patch ``test``, was refused), 429/5xx/unreachable ->
``TransientError`` (with the ``Retry-After`` the server sent), any other refusal (RBAC, a bad
token) -> ``KubeError``. Messages carry the apiserver's ``Status`` reason and message, never
a request body.
"""

from __future__ import annotations

import contextlib
import json

from common.errors import Conflict, KubeError, ModelcacheError, NotFound, TransientError


class Expired(TransientError):
    """``410 Gone``: the resourceVersion asked for is older than the server keeps."""

    reason = "expired"


class Invalid(KubeError):
    """``422``: the apiserver refused the object as invalid, or a JSON patch whose ``test``
    failed (the object changed since it was read)."""

    reason = "kube_invalid"


def api_error(what: str, status: int, body: bytes, retry_after: str | None = None
              ) -> ModelcacheError:
    """The error for an apiserver reply with this status and ``Status`` body."""
    reason, message = "", ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason", "")), str(doc.get("message", ""))
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    text = f"{what}: {status} {reason}: {message}".rstrip(": ")
    if status == 404:
        return NotFound(text)
    if status == 409:
        return Conflict(text)
    if status == 410:
        return Expired(text)
    if status == 422:
        return Invalid(text)
    if status == 429 or status >= 500:
        delay: float | None = None
        with contextlib.suppress(TypeError, ValueError):
            delay = float(retry_after) if retry_after else None
        return TransientError(text, retry_after=delay)
    return KubeError(text)


def describe(e: BaseException) -> str:
    """A foreign exception in a message: its type, and its text if it has one."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

"""Admission transport: an HTTP request in, an AdmissionReview response out.

Steps 1 and 5 of admission (review -> annotations -> plan -> patch -> response), shaped like
controller-runtime's ``pkg/webhook/admission`` (http.go, webhook.go, response.go):

- the transport caps the body (413 beyond) and requires ``Content-Type: application/json``
  (415 otherwise); a body that is not an AdmissionReview is a 400;
- the answer is in the request's own apiVersion (``admission.k8s.io/v1`` or ``v1beta1``);
- only pod CREATE is planned; DELETE, CONNECT, UPDATE, sub-resources, mirror pods and the
  webhook's own namespace are allowed untouched. The planner has no side effects, so a
  dry-run request is answered exactly like a real one;
- no change means no patch; a change is a base64 ``JSONPatch``;
- any crash becomes an errored response (``allowed: false``, code 500) that still carries
  the request's UID, so the API server applies the webhook's failurePolicy with a reason.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from aiohttp import web

from . import patch
from .annotations import MIRROR
from .plan import Denial, MalformedPod, Plan, plan
from .settings import PlanSettings

REVIEW_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_WARNING_CHARS = 120
MAX_WARNINGS = 16
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")

#: admission outcomes, the bounded label values of the admissions metric
OUTCOMES = ("mutated", "skipped", "denied", "error")


class Planner(Protocol):
    def __call__(
        self, pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None,
        settings: PlanSettings, namespace: str | None = None,
    ) -> Plan | Denial: ...


@dataclass(frozen=True)
class Context:
    """What answering a review needs, passed in (no globals)."""

    settings: PlanSettings
    own_namespace: str
    namespace_labels: Callable[[str], Mapping[str, str] | None]
    planner: Planner = plan


@dataclass(frozen=True)
class Outcome:
    """An answer, with what the server logs and counts about it."""

    status: int
    body: dict[str, Any]
    outcome: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Log context: uid, namespace, pod, operation, mode, denied annotation. No values."""
    crash: BaseException | None = None
    """The exception behind an errored answer, for the log's traceback."""


class TooLarge(Exception):
    """The request body is over the cap."""


async def admit(request: web.Request, ctx: Context, max_body: int) -> Outcome:
    """Answer one HTTP request to ``/mutate``."""
    if request.content_type != "application/json":
        return _http_error(415, f"Content-Type must be application/json, not "
                                f"{request.content_type or 'missing'}")
    try:
        body = await read_body(request, max_body)
    except TooLarge:
        return _http_error(413, f"AdmissionReview larger than {max_body} bytes")
    return review(body, ctx)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def review(body: bytes, ctx: Context) -> Outcome:
    """Answer an AdmissionReview given as bytes. Never raises."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return _http_error(400, "body is not JSON")
    if not isinstance(document, dict) or document.get("kind") != "AdmissionReview":
        return _http_error(400, "body is not an AdmissionReview")
    api_version = document.get("apiVersion")
    if api_version not in REVIEW_VERSIONS:
        return _http_error(400, f"AdmissionReview apiVersion must be one of "
                                f"{', '.join(REVIEW_VERSIONS)}")
    request = document.get("request")
    uid = request.get("uid") if isinstance(request, dict) else None
    if not isinstance(request, dict) or not isinstance(uid, str) or not uid:
        return _http_error(400, "AdmissionReview has no request.uid")
    answer = _Answer(str(api_version), uid, _fields(request))
    try:
        return _decide(request, ctx, answer)
    except MalformedPod as e:
        return answer.errored(400, f"the object is not a valid pod: {e}")
    except Exception as e:  # a crash must still answer, with the UID
        message = f"internal error in the modelcache webhook ({type(e).__name__})"
        return replace(answer.errored(500, message), crash=e)


def _decide(request: dict[str, Any], ctx: Context, answer: _Answer) -> Outcome:
    resource = request.get("resource") or {}
    is_pod = isinstance(resource, dict) and resource.get("group", "") == "" and (
        resource.get("resource") == "pods")
    if not is_pod or request.get("subResource") or request.get("operation") != "CREATE":
        return answer.skipped("not a pod creation")
    namespace = request.get("namespace") or ""
    if namespace == ctx.own_namespace:
        return answer.skipped("the webhook's own namespace")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise MalformedPod("request.object is missing")
    metadata = pod.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if isinstance(annotations, dict) and MIRROR in annotations:
        return answer.skipped("mirror pod")
    result = ctx.planner(pod, ctx.namespace_labels(str(namespace)), ctx.settings,
                         str(namespace))
    if isinstance(result, Denial):
        answer.fields["annotation"] = result.annotation
        return answer.denied(result.message)
    operations = patch.make(pod, result.pod)
    if not operations:
        return answer.skipped("nothing to change", result.warnings)
    answer.fields["mode"] = result.mode
    return answer.mutated(operations, result.warnings)


def _fields(request: dict[str, Any]) -> dict[str, Any]:
    pod = request.get("object") if isinstance(request.get("object"), dict) else {}
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or meta.get("generateName") or request.get("name")
    return {
        "uid": request.get("uid"),
        "namespace": request.get("namespace"),
        "pod": name if isinstance(name, str) else None,
        "operation": request.get("operation"),
        "dry_run": bool(request.get("dryRun")),
    }


class _Answer:
    """Builds responses in the request's own apiVersion, for the request's UID."""

    def __init__(self, api_version: str, uid: str, fields: dict[str, Any]) -> None:
        self.api_version = api_version
        self.uid = uid
        self.fields = fields

    def _review(self, outcome: str, response: dict[str, Any], status: int = 200) -> Outcome:
        body = {"apiVersion": self.api_version, "kind": "AdmissionReview",
                "response": {"uid": self.uid, **response}}
        return Outcome(status, body, outcome, self.fields)

    def skipped(self, why: str, warnings: tuple[str, ...] = ()) -> Outcome:
        self.fields["why"] = why
        return self._review("skipped", {"allowed": True, **_warnings(warnings)})

    def mutated(self, operations: list[patch.Operation], warnings: tuple[str, ...]) -> Outcome:
        encoded = base64.b64encode(patch.encode(operations)).decode()
        response = {"allowed": True, "patchType": "JSONPatch", "patch": encoded,
                    **_warnings(warnings)}
        return self._review("mutated", response)

    def denied(self, message: str) -> Outcome:
        status = {"status": "Failure", "message": message, "reason": "Forbidden", "code": 403}
        return self._review("denied", {"allowed": False, "status": status})

    def errored(self, code: int, message: str) -> Outcome:
        reason = "BadRequest" if code == 400 else "InternalError"
        status = {"status": "Failure", "message": message, "reason": reason, "code": code}
        return self._review("error", {"allowed": False, "status": status})


def _warnings(warnings: tuple[str, ...]) -> dict[str, list[str]]:
    """Warnings as the API server shows them: printable, at most 120 characters each."""
    if not warnings:
        return {}
    shown = []
    for warning in warnings[:MAX_WARNINGS]:
        text = _UNPRINTABLE.sub("?", warning)
        if len(text) > MAX_WARNING_CHARS:
            text = text[: MAX_WARNING_CHARS - 3] + "..."
        shown.append(text)
    return {"warnings": shown}


def _http_error(status: int, message: str) -> Outcome:
    """A transport-level failure: not an AdmissionReview at all."""
    return Outcome(status, {"error": message}, "error", {"http_status": status})

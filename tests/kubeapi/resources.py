"""The resource types the fake serves: where they live, what they accept, how they differ.

Built-in types (namespaces, nodes, pods, secrets, configmaps, core and events.k8s.io events,
leases, mutating webhook configurations) carry the per-type behaviour of their registry
strategies that a client can observe; custom resources come from a CRD manifest (``crd.py``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.kubeapi.crd import CustomSchema, served_version
from tests.kubeapi.errors import ApiError, bad_request, invalid
from tests.kubeapi.selectors import LABEL_KEY, LABEL_VALUE

JSON = dict[str, Any]
Cause = tuple[str, str, str]

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    #: objects of types sharing a bucket are one object seen through two APIs (events)
    bucket: str = ""
    subresources: frozenset[str] = frozenset()
    #: field selector labels supported besides metadata.name and metadata.namespace
    fields: tuple[str, ...] = ()
    #: field selector aliases: label -> stored field (events.k8s.io names)
    field_aliases: tuple[tuple[str, str], ...] = ()
    #: DELETE answers with the deleted object rather than a Status (registry option)
    returns_deleted: bool = False
    builtin: bool = True
    #: a PUT may create the object (AllowCreateOnUpdate)
    create_on_update: bool = False
    #: not stored: only POST, answered from a hook (TokenReview, SubjectAccessReview)
    virtual: bool = False
    name_is_label: bool = False
    validate: Callable[[JSON, JSON | None], list[Cause]] | None = field(
        default=None, compare=False, hash=False
    )
    to_storage: Callable[[JSON], JSON] | None = field(default=None, compare=False, hash=False)
    from_storage: Callable[[JSON], JSON] | None = field(default=None, compare=False, hash=False)
    schema: CustomSchema | None = field(default=None, compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def key(self) -> str:
        return self.bucket or self.group_resource

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def supports_field(self, label: str) -> bool:
        return label in ("metadata.name", "metadata.namespace") or label in self.fields or any(
            a == label for a, _ in self.field_aliases
        )

    def stored_field(self, label: str) -> str:
        return dict(self.field_aliases).get(label, label)


def field_value(obj: JSON, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


# --- metadata ------------------------------------------------------------------------------


def validate_meta(rt: ResourceType, obj: JSON) -> list[Cause]:
    meta = obj.get("metadata") or {}
    causes: list[Cause] = []
    name = meta.get("name", "")
    pattern, limit = (_LABEL, 63) if rt.name_is_label else (_SUBDOMAIN, 253)
    if not name:
        causes.append(("metadata.name", "FieldValueRequired", "Required value: name or "
                       "generateName is required"))
    elif len(name) > limit or not pattern.match(name):
        what = "RFC 1123 label" if rt.name_is_label else "RFC 1123 subdomain"
        causes.append(("metadata.name", "FieldValueInvalid",
                       f'Invalid value: "{name}": a lowercase {what} must consist of lower case '
                       "alphanumeric characters, '-' or '.', and must start and end with an "
                       "alphanumeric character"))
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified(key):
            causes.append(("metadata.labels", "FieldValueInvalid",
                           f'Invalid value: "{key}": name part must consist of alphanumeric '
                           "characters, '-', '_' or '.', and must start and end with an "
                           "alphanumeric character"))
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            causes.append(("metadata.labels", "FieldValueInvalid",
                           f'Invalid value: "{value}": a valid label must be an empty string or '
                           "consist of alphanumeric characters, '-', '_' or '.', and must start "
                           "and end with an alphanumeric character"))
    annotations = meta.get("annotations") or {}
    size = 0
    for key, value in annotations.items():
        size += len(key) + len(str(value))
        if not _qualified(key):
            causes.append(("metadata.annotations", "FieldValueInvalid",
                           f'Invalid value: "{key}": name part must consist of alphanumeric '
                           "characters, '-', '_' or '.'"))
        if not isinstance(value, str):
            causes.append(("metadata.annotations", "FieldValueTypeInvalid",
                           "Invalid value: annotation values must be strings"))
    if size > MAX_ANNOTATIONS_BYTES:
        causes.append(("metadata.annotations", "FieldValueTooLong",
                       f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"))
    return causes


def _qualified(key: str) -> bool:
    if not LABEL_KEY.match(key):
        return False
    prefix, _, name = key.rpartition("/")
    return len(name) <= 63 and len(prefix) <= 253


# --- per type ------------------------------------------------------------------------------


def _validate_pod(obj: JSON, old: JSON | None) -> list[Cause]:
    spec = obj.get("spec") or {}
    containers = spec.get("containers")
    causes: list[Cause] = []
    if not containers:
        causes.append(("spec.containers", "FieldValueRequired", "Required value"))
    for i, c in enumerate(containers or []):
        for need in ("name", "image"):
            if not c.get(need):
                causes.append((f"spec.containers[{i}].{need}", "FieldValueRequired",
                               "Required value"))
    if old is not None:
        old_node = (old.get("spec") or {}).get("nodeName")
        if old_node and spec.get("nodeName") != old_node:
            causes.append(("spec", "FieldValueForbidden",
                           "Forbidden: pod updates may not change fields other than "
                           "`spec.containers[*].image`, `spec.activeDeadlineSeconds`, "
                           "`spec.tolerations` (only additions to existing tolerations), "
                           "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it "
                           "was previously negative)"))
    return causes


def _secret_to_storage(obj: JSON) -> JSON:
    obj = dict(obj)
    data = dict(obj.get("data") or {})
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise bad_request(f"illegal base64 data at input byte 0 (data[{key}])") from e
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    obj.setdefault("type", "Opaque")
    return obj


def _validate_secret(obj: JSON, old: JSON | None) -> list[Cause]:
    """ValidateSecret: the keys a typed Secret needs, and a type that never changes."""
    causes: list[Cause] = []
    data = obj.get("data") or {}
    if obj.get("type") == "kubernetes.io/tls":
        causes += [(f"data[{key}]", "FieldValueRequired", "Required value")
                   for key in ("tls.crt", "tls.key") if key not in data]
    if old is not None and old.get("type") != obj.get("type"):
        causes.append(("type", "FieldValueInvalid",
                       f'Invalid value: "{obj.get("type")}": field is immutable'))
    return causes


_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_CONFIG_MAP_BYTES = 1024 * 1024


def _validate_config_map(obj: JSON, old: JSON | None) -> list[Cause]:
    """ValidateConfigMap: keys are config keys, string values, 1 MiB in all."""
    causes: list[Cause] = []
    data = obj.get("data") or {}
    size = 0
    for key, value in data.items():
        if not _CONFIG_KEY.match(key) or len(key) > 253:
            causes.append((f"data[{key}]", "FieldValueInvalid",
                           f'Invalid value: "{key}": a valid config key must consist of '
                           "alphanumeric characters, '-', '_' or '.'"))
        if not isinstance(value, str):
            causes.append((f"data[{key}]", "FieldValueInvalid", "Invalid value: not a string"))
        else:
            size += len(key) + len(value.encode())
    if size > MAX_CONFIG_MAP_BYTES:
        causes.append(("data", "FieldValueTooLong",
                       f"Too long: must have at most {MAX_CONFIG_MAP_BYTES} bytes"))
    return causes


def _webhook_config_to_storage(obj: JSON) -> JSON:
    """``caBundle`` is a []byte: JSON carries it base64-encoded, or the decoding fails."""
    for i, hook in enumerate(obj.get("webhooks") or []):
        bundle = (hook.get("clientConfig") or {}).get("caBundle")
        if bundle is None:
            continue
        try:
            base64.b64decode(bundle, validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise bad_request(f"illegal base64 data in webhooks[{i}].clientConfig.caBundle") from e
    return obj


_EVENT_FIELDS = (
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
)


def _event_to_core(obj: JSON) -> JSON:
    out = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    for new, old in _EVENT_FIELDS:
        if new in out:
            out[old] = out.pop(new)
    return out


def _event_from_core(obj: JSON) -> JSON:
    out = dict(obj)
    for new, old in _EVENT_FIELDS:
        if old in out:
            out[new] = out.pop(old)
    return out


def _validate_event_namespace(obj: JSON, involved: JSON) -> list[Cause]:
    ns = (obj.get("metadata") or {}).get("namespace", "")
    inv_ns = involved.get("namespace", "")
    if inv_ns and inv_ns != ns:
        return [("involvedObject.namespace", "FieldValueInvalid",
                 f'Invalid value: "{inv_ns}": does not match event.namespace')]
    if not inv_ns and ns not in ("", "default"):
        return [("involvedObject.namespace", "FieldValueInvalid",
                 'Invalid value: "": does not match event.namespace')]
    return []


def _validate_core_event(obj: JSON, old: JSON | None) -> list[Cause]:
    return _validate_event_namespace(obj, obj.get("involvedObject") or {})


def _validate_events_v1(obj: JSON, old: JSON | None) -> list[Cause]:
    """events.k8s.io/v1 validation (checked on the stored, core-shaped object)."""
    causes = _validate_event_namespace(obj, obj.get("involvedObject") or {})
    if not obj.get("eventTime"):
        causes.append(("eventTime", "FieldValueRequired", "Required value"))
    if obj.get("type") not in ("Normal", "Warning"):
        causes.append(("type", "FieldValueNotSupported",
                       f'Unsupported value: "{obj.get("type", "")}": supported values: '
                       '"Normal", "Warning"'))
    for stored, shown, limit in (
        ("reportingComponent", "reportingController", 253),
        ("reportingInstance", "reportingInstance", 128),
        ("action", "action", 128),
        ("reason", "reason", 128),
    ):
        value = obj.get(stored) or ""
        if not value:
            causes.append((shown, "FieldValueRequired", "Required value"))
        elif len(value) > limit:
            causes.append((shown, "FieldValueTooLong", f"Too long: may not be more than {limit}"))
    if len((obj.get("message") or "").encode()) > 1024:
        causes.append(("note", "FieldValueTooLong", "Too long: may not be more than 1024 bytes"))
    return causes


def _validate_lease(obj: JSON, old: JSON | None) -> list[Cause]:
    """ValidateLeaseSpec: durations positive, transitions not negative."""
    spec = obj.get("spec") or {}
    causes: list[Cause] = []
    for name, least in (("leaseDurationSeconds", 1), ("leaseTransitions", 0)):
        value = spec.get(name)
        if value is not None and (not isinstance(value, int) or value < least):
            causes.append((f"spec.{name}", "FieldValueInvalid",
                           f"Invalid value: {value}: must be greater than or equal to {least}"))
    return causes


_EVENT_FIELD_LABELS = (
    "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
    "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
    "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
)

BUILTINS: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", False, name_is_label=True,
                 subresources=frozenset({"status"}), fields=("status.phase",)),
    ResourceType("", "v1", "nodes", "Node", False, subresources=frozenset({"status"}),
                 fields=("spec.unschedulable",)),
    ResourceType("", "v1", "pods", "Pod", True, subresources=frozenset({"status"}),
                 returns_deleted=True, validate=_validate_pod,
                 fields=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                         "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                         "status.podIP", "status.nominatedNodeName")),
    ResourceType("", "v1", "secrets", "Secret", True, fields=("type",),
                 to_storage=_secret_to_storage, validate=_validate_secret),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, validate=_validate_config_map),
    ResourceType("", "v1", "events", "Event", True, bucket="events", create_on_update=True,
                 fields=_EVENT_FIELD_LABELS, validate=_validate_core_event),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, bucket="events",
                 create_on_update=True, fields=_EVENT_FIELD_LABELS,
                 field_aliases=(
                     ("regarding.kind", "involvedObject.kind"),
                     ("regarding.namespace", "involvedObject.namespace"),
                     ("regarding.name", "involvedObject.name"),
                     ("regarding.uid", "involvedObject.uid"),
                     ("regarding.apiVersion", "involvedObject.apiVersion"),
                     ("regarding.resourceVersion", "involvedObject.resourceVersion"),
                     ("regarding.fieldPath", "involvedObject.fieldPath"),
                     ("reportingController", "reportingComponent"),
                 ),
                 validate=_validate_events_v1, to_storage=_event_to_core,
                 from_storage=_event_from_core),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, validate=_validate_lease),
    ResourceType("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
                 "MutatingWebhookConfiguration", False, to_storage=_webhook_config_to_storage),
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False,
                 virtual=True),
    ResourceType("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview",
                 False, virtual=True),
)


def from_crd(crd: JSON, version: str | None = None) -> ResourceType:
    """A custom resource type served from a CRD manifest (its storage version by default)."""
    spec = crd["spec"]
    served = served_version(crd, version)
    schema = CustomSchema(served["schema"]["openAPIV3Schema"])
    subresources = frozenset((served.get("subresources") or {}).keys())
    selectable = tuple(
        f["jsonPath"].lstrip(".") for f in served.get("selectableFields") or []
    )

    def validate(obj: JSON, old: JSON | None) -> list[Cause]:
        return schema.errors(obj)

    # what etcd holds is pruned and defaulted by the schema as it is read, as the
    # apiserver's storage decoder does: fields a newer CRD dropped are not served, and go
    # from etcd at the object's next write
    return ResourceType(
        spec["group"], served["name"], spec["names"]["plural"], spec["names"]["kind"],
        spec["scope"] == "Namespaced", subresources=subresources, fields=selectable,
        builtin=False, validate=validate, from_storage=schema.prune_and_default, schema=schema,
    )


def check(rt: ResourceType, obj: JSON, old: JSON | None) -> None:
    """Raise the 422 a real server would give for ``obj`` (the stored shape)."""
    causes = validate_meta(rt, obj)
    if rt.validate is not None:
        causes += rt.validate(obj, old)
    if causes:
        name = (obj.get("metadata") or {}).get("name", "")
        raise invalid(rt.group, rt.kind, name, causes)


def require_kind(rt: ResourceType, body: JSON) -> None:
    """A body naming another kind or version is refused, as the decoder does."""
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if kind and kind != rt.kind:
        raise bad_request(f"the body of the request was of kind {kind}, expected {rt.kind}")
    if api_version and api_version != rt.api_version:
        raise ApiError(400, "BadRequest",
                       f"the API version in the data ({api_version}) does not match the "
                       f"expected API version ({rt.api_version})")

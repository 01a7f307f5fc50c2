"""Schemas for everything the manifests contain, by apiVersion and kind.

- Kubernetes' own kinds: kubernetes-validate's strict schemas for a given version.
- CachedModel: the openAPIV3Schema of the CRD that the same render contains (made strict:
  a field the CRD does not declare is an error, as `kubectl apply --validate=strict` says).
- cert-manager (Issuer, Certificate), Prometheus Operator (ServiceMonitor, PrometheusRule)
  and kind's Cluster config: structural schemas written from their documented APIs, strict
  for the fields we use. Their CRDs are not installed here; this catches a misspelt or
  misplaced field, not every semantic rule of those projects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv

Schema = dict[str, Any]


def _obj(props: Mapping[str, Any], required: tuple[str, ...] = ()) -> Schema:
    s: Schema = {"type": "object", "properties": dict(props), "additionalProperties": False}
    if required:
        s["required"] = list(required)
    return s


STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
STRS: Schema = {"type": "array", "items": STR}
STRMAP: Schema = {"type": "object", "additionalProperties": STR}
DURATION: Schema = {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d|w|y))+$"}
METADATA: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP},
    "additionalProperties": False,
}


def _resource(group_version: str, kind: str, spec: Schema) -> Schema:
    return _obj({"apiVersion": {"const": group_version}, "kind": {"const": kind},
                 "metadata": METADATA, "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


_ISSUER_REF = _obj({"name": STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STR},
                   ("name",))
_ISSUER_SPEC: Schema = {
    **_obj({
        "selfSigned": _obj({"crlDistributionPoints": STRS}),
        "ca": _obj({"secretName": STR, "crlDistributionPoints": STRS, "ocspServers": STRS,
                    "issuingCertificateURLs": STRS}, ("secretName",)),
        "acme": {"type": "object"},
        "vault": {"type": "object"},
        "venafi": {"type": "object"},
    }),
    "minProperties": 1,
    "maxProperties": 1,
}
_USAGES = ["signing", "digital signature", "content commitment", "key encipherment",
           "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
           "decipher only", "any", "server auth", "client auth", "code signing",
           "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
           "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
_CERTIFICATE_SPEC = _obj({
    "secretName": STR,
    "issuerRef": _ISSUER_REF,
    "commonName": STR,
    "dnsNames": STRS,
    "ipAddresses": STRS,
    "uris": STRS,
    "emailAddresses": STRS,
    "duration": DURATION,
    "renewBefore": DURATION,
    "isCA": BOOL,
    "usages": {"type": "array", "items": {"enum": _USAGES}},
    "privateKey": _obj({
        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
        "size": INT,
        "encoding": {"enum": ["PKCS1", "PKCS8"]},
        "rotationPolicy": {"enum": ["Never", "Always"]},
    }),
    "subject": {"type": "object"},
    "secretTemplate": _obj({"labels": STRMAP, "annotations": STRMAP}),
    "revisionHistoryLimit": INT,
}, ("secretName", "issuerRef"))

_SECRET_KEY = _obj({"name": STR, "key": STR, "optional": BOOL}, ("key",))
_RELABEL = _obj({
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod",
                        "HashMod", "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                        "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                        "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
    "sourceLabels": STRS,
    "separator": STR,
    "targetLabel": STR,
    "regex": STR,
    "modulus": INT,
    "replacement": STR,
})
_SAFE_TLS = _obj({
    "ca": _obj({"secret": _SECRET_KEY, "configMap": _SECRET_KEY}),
    "cert": _obj({"secret": _SECRET_KEY, "configMap": _SECRET_KEY}),
    "keySecret": _SECRET_KEY,
    "serverName": STR,
    "insecureSkipVerify": BOOL,
})
_ENDPOINT = _obj({
    "port": STR,
    "targetPort": {"type": ["string", "integer"]},
    "path": STR,
    "scheme": {"enum": ["http", "https"]},
    "params": {"type": "object"},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "tlsConfig": _SAFE_TLS,
    "authorization": {"type": "object"},
    "honorLabels": BOOL,
    "honorTimestamps": BOOL,
    "followRedirects": BOOL,
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
})
_LABEL_SELECTOR = _obj({
    "matchLabels": STRMAP,
    "matchExpressions": {"type": "array", "items": _obj(
        {"key": STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
         "values": STRS}, ("key", "operator"))},
})
_SERVICE_MONITOR_SPEC = _obj({
    "selector": _LABEL_SELECTOR,
    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    "namespaceSelector": _obj({"any": BOOL, "matchNames": STRS}),
    "jobLabel": STR,
    "targetLabels": STRS,
    "podTargetLabels": STRS,
    "sampleLimit": INT,
    "attachMetadata": _obj({"node": BOOL}),
}, ("selector",))
_RULE: Schema = {
    **_obj({"alert": STR, "record": STR, "expr": STR, "for": DURATION,
            "keep_firing_for": DURATION, "labels": STRMAP, "annotations": STRMAP}, ("expr",)),
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
_PROMETHEUS_RULE_SPEC = _obj({
    "groups": {"type": "array", "items": _obj({
        "name": STR, "interval": DURATION, "limit": INT, "partial_response_strategy": STR,
        "rules": {"type": "array", "items": _RULE},
    }, ("name", "rules"))},
}, ("groups",))

KIND_CLUSTER = _obj({
    "kind": {"const": "Cluster"},
    "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
    "name": STR,
    "nodes": {"type": "array", "minItems": 1, "items": _obj({
        "role": {"enum": ["control-plane", "worker"]},
        "image": {"type": "string",
                  "pattern": r"^kindest/node:v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?$"},
        "labels": STRMAP,
        "extraMounts": {"type": "array"},
        "extraPortMappings": {"type": "array"},
        "kubeadmConfigPatches": STRS,
    }, ("role",))},
    "networking": {"type": "object"},
    "featureGates": {"type": "object"},
    "kubeadmConfigPatches": STRS,
}, ("kind", "apiVersion"))

THIRD_PARTY: dict[tuple[str, str], Schema] = {
    ("cert-manager.io/v1", "Issuer"): _resource("cert-manager.io/v1", "Issuer", _ISSUER_SPEC),
    ("cert-manager.io/v1", "Certificate"):
        _resource("cert-manager.io/v1", "Certificate", _CERTIFICATE_SPEC),
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        _resource("monitoring.coreos.com/v1", "ServiceMonitor", _SERVICE_MONITOR_SPEC),
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        _resource("monitoring.coreos.com/v1", "PrometheusRule", _PROMETHEUS_RULE_SPEC),
}


def crd_schemas(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Schema]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD."""
    out: dict[tuple[str, str], Schema] = {}
    for crd in docs:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = strict_openapi(version["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["metadata"] = METADATA
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind",
                                         "metadata"})
            out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return out


def strict_openapi(schema: Mapping[str, Any]) -> Schema:
    """A CRD's structural schema as JSON Schema, rejecting undeclared fields the way the API
    server prunes them (unless x-kubernetes-preserve-unknown-fields says keep them)."""
    s: Schema = {k: copy.deepcopy(v) for k, v in schema.items()
                 if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: strict_openapi(v) for k, v in s["properties"].items()}
        if ("additionalProperties" not in s
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), Mapping):
        s["additionalProperties"] = strict_openapi(s["additionalProperties"])
    if isinstance(s.get("items"), Mapping):
        s["items"] = strict_openapi(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [strict_openapi(x) for x in s[key]]
    return s


def validate(doc: Mapping[str, Any], version: str,
             custom: Mapping[tuple[str, str], Schema]) -> None:
    """Raise if ``doc`` does not validate; every kind must have a schema (no silent skip)."""
    key = (doc["apiVersion"], doc["kind"])
    schema = custom.get(key) or THIRD_PARTY.get(key)
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    kv.validate(dict(doc), version, strict=True)

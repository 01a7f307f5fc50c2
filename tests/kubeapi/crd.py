"""Serving a CustomResourceDefinition the way apiextensions-apiserver does, for one version.

Requests are checked against the version's ``openAPIV3Schema`` (a 422 with the failing
fields), defaults from the schema are filled in, and fields the schema does not know are
pruned (unless ``x-kubernetes-preserve-unknown-fields``). CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

JSON = dict[str, Any]


def served_version(crd: JSON, version: str | None = None) -> JSON:
    versions = crd["spec"]["versions"]
    for v in versions:
        if (version is None and v.get("storage")) or v["name"] == version:
            return dict(v)
    raise ValueError(f"CRD {crd['metadata']['name']} does not serve {version}")


def to_json_schema(schema: JSON) -> JSON:
    """OpenAPI v3 (structural, Kubernetes flavour) to a JSON schema jsonschema can check."""
    out: JSON = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "example"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


class CustomSchema:
    """Validation, defaulting and pruning for one CRD version's schema."""

    def __init__(self, schema: JSON) -> None:
        self.schema = schema
        body = copy.deepcopy(schema)
        # metadata is validated as ObjectMeta by the server, not by the CRD schema
        body.get("properties", {}).pop("metadata", None)
        self._validator = jsonschema.Draft7Validator(
            to_json_schema(body), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
        )

    def errors(self, obj: JSON) -> list[tuple[str, str, str]]:
        """(field, reason, message) for every violation, as the apiserver reports them."""
        out: list[tuple[str, str, str]] = []
        for err in sorted(self._validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in err.absolute_path)
            if err.validator == "required":
                missing = err.message.split("'")[1] if "'" in err.message else ""
                field = f"{path}.{missing}" if path else missing
                out.append((field, "FieldValueRequired", "Required value"))
            elif err.validator == "enum":
                allowed = ", ".join(f'"{v}"' for v in err.validator_value)
                out.append((
                    path, "FieldValueNotSupported",
                    f'Unsupported value: "{err.instance}": supported values: {allowed}',
                ))
            elif err.validator == "type":
                out.append((
                    path, "FieldValueTypeInvalid",
                    f'Invalid value: "{type(err.instance).__name__}": {path} in body must be '
                    f"of type {err.validator_value}: {err.instance!r}",
                ))
            elif err.validator in ("maxLength", "maxItems", "maxProperties"):
                out.append((
                    path, "FieldValueTooLong",
                    f"Too long: may not be more than {err.validator_value}",
                ))
            else:
                out.append((path, "FieldValueInvalid", f"Invalid value: {err.message}"))
        return out

    def prune_and_default(self, obj: JSON) -> JSON:
        out = _walk(obj, self.schema, root=True)
        assert isinstance(out, dict)
        return out


def _walk(value: Any, schema: JSON, root: bool = False) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        out: JSON = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
            elif props and key in props:
                out[key] = _walk(item, props[key])
            elif isinstance(extra, dict):
                out[key] = _walk(item, extra)
            elif preserve or extra is True:
                out[key] = item
        for key, sub in (props or {}).items():
            if key not in out and "default" in sub:
                out[key] = _walk(copy.deepcopy(sub["default"]), sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_walk(v, schema["items"]) for v in value]
    return value

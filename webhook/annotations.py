"""Read and validate a pod's ``modelcache.io/*`` annotations (step 2 of admission).

Every problem raises :class:`AnnotationError` naming the annotation and what is wrong;
the planner turns it into a denial. Nothing here makes a network call.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Literal, cast

from common.reference import (
    InvalidInput,
    InvalidReference,
    Reference,
    check_policy_name,
    parse,
    scoped,
)

from .hosts import refused_host

PREFIX = "modelcache.io/"
MODEL = PREFIX + "model"
MOUNT_PATH = PREFIX + "mount-path"
INCLUDE = PREFIX + "include"
CREDENTIALS = PREFIX + "credentials"
FALLBACK = PREFIX + "fallback"
MODE = PREFIX + "mode"
CONTAINERS = PREFIX + "containers"
PLACEMENT = PREFIX + "placement"
SIZE = PREFIX + "size"
#: "false": the node's agent does not read the model into the page cache for this pod (the
#: agent reads it from the pod itself, through its pod watch)
WARM_MEMORY = PREFIX + "warm-memory"
VERIFY = PREFIX + "verify"
#: written by the webhook: what it injected (DESIGN.md fixes the name)
INJECTED = PREFIX + "injected"
#: the opt-in label (the webhook's objectSelector)
INJECT_LABEL = PREFIX + "inject"
#: kubelet marks static pods' API mirrors with it
MIRROR = "kubernetes.io/config.mirror"

KNOWN = frozenset(
    {MODEL, MOUNT_PATH, INCLUDE, CREDENTIALS, FALLBACK, MODE, CONTAINERS, PLACEMENT, SIZE,
     WARM_MEMORY, VERIFY, INJECTED}
)

DEFAULT_MOUNT_PATH = "/mnt/models"
#: where the model's store directory appears inside the pod (the symlinks point here)
SIDE_PATH = "/var/run/modelcache/model"
MAX_VALUE_BYTES = 4096
MAX_MOUNT_PATH = 512
MAX_SIZE_BYTES = 2**62

Mode = Literal["csi", "cache", "download"]
Fallback = Literal["source", "none"]
Placement = Literal["prefer-warm", "require-warm"]

#: a mount path may not be at or under these: kernel and runtime trees, secrets, our own
FORBIDDEN_TREES = (
    "/proc", "/sys", "/dev", "/etc", "/var/run/secrets", "/run/secrets",
    "/var/run/modelcache", "/run/modelcache",
)
#: where the init image's own program lives (Dockerfile: the venv in /opt/modelcache, the
#: base image's Python in /usr/local, the system's libraries): the init container mounts
#: the model's emptyDir at the mount path, so a mount path at, under or above one of these
#: would hide the program that fills it (tests/deploy check it against the Dockerfile)
IMAGE_TREES = ("/opt/modelcache", "/usr/local", "/usr/bin", "/usr/sbin", "/usr/lib",
               "/usr/lib64", "/bin", "/sbin", "/lib", "/lib64")
#: a file name's limit (NAME_MAX): a longer segment cannot be created
MAX_SEGMENT_BYTES = 255
#: nor exactly one of these: mounting over them breaks the image
FORBIDDEN_EXACT = frozenset(
    {"/bin", "/boot", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/usr", "/usr/bin",
     "/usr/lib", "/usr/local", "/usr/sbin", "/var", "/var/lib", "/var/run", "/run",
     "/tmp", "/root", "/home"}  # noqa: S108 - paths in the pod, refused
)

_SEGMENT = re.compile(r"^[A-Za-z0-9._@+~-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][+]?[0-9]{1,2})?$"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class AnnotationError(InvalidInput):
    """A ``modelcache.io/*`` annotation the webhook cannot accept."""

    reason = "annotation"

    def __init__(self, annotation: str, problem: str) -> None:
        super().__init__(f"annotation {annotation}: {problem}")
        #: the annotation at fault (bounded: one of :data:`KNOWN`, or a pod-level key)
        self.annotation = annotation


@dataclass(frozen=True)
class ModelRequest:
    """What a pod asks for, validated."""

    reference: Reference
    uri: str
    """The URI as written (stripped): the init container gets it verbatim."""
    mount_path: str = DEFAULT_MOUNT_PATH
    credentials: str | None = None
    fallback: Fallback = "source"
    mode: Mode | None = None
    """None: not set, the planner chooses (``csi`` where the driver is installed, else from
    the namespace's Pod Security level)."""
    containers: tuple[str, ...] | None = None
    """None: every app container."""
    placement: Placement = "prefer-warm"
    size_bytes: int | None = None
    warm_memory: bool = True
    """Whether the node's agent may read the model into the page cache ahead of the pod."""
    verify: str | None = None
    """The signature policy the model must pass (a ConfigMap of the pod's namespace); its
    scope is in ``reference.verify`` and so in the key."""
    explicit: frozenset[str] = field(default=frozenset())
    """The annotations that were set (so the planner can warn about ones without effect)."""
    unknown: tuple[str, ...] = ()
    """``modelcache.io/*`` keys this webhook does not know (typos, most likely)."""


def wants_model(annotations: Mapping[str, object], labels: Mapping[str, object]) -> bool:
    """Whether the pod asked for a model at all (opt-in label or any of our annotations)."""
    if labels.get(INJECT_LABEL) == "true":
        return True
    return any(key in KNOWN and key != INJECTED for key in annotations)


def read(annotations: Mapping[str, object], allow_hosts: tuple[str, ...] = (),
         namespace: str = "") -> ModelRequest:
    """Validate the pod's annotations; raise :class:`AnnotationError` on the first problem.
    ``namespace``: the pod's (a signature policy is a ConfigMap there, so it scopes the key)."""
    values = {key: _string(key, value) for key, value in annotations.items()
              if key.startswith(PREFIX)}
    uri = values.get(MODEL)
    if uri is None:
        raise AnnotationError(MODEL, "is required (the model's URI, e.g. hf://org/name)")
    uri = uri.strip()
    include = values.get(INCLUDE)
    verify = _verify(values.get(VERIFY))
    credentials = _credentials(values.get(CREDENTIALS))
    try:
        # the key the pod's directory is named by: the reference, its credentials scope
        # (this namespace's Secret) and its signature policy, as the agent computes it
        reference = scoped(uri, include, namespace=namespace or None,
                           credentials=credentials, verify=verify)
    except InvalidReference as e:
        where = INCLUDE if include is not None and _only_include_wrong(uri) else MODEL
        raise AnnotationError(where, str(e)) from e
    refusal = refused_host(reference, allow_hosts)
    if refusal is not None:
        raise AnnotationError(MODEL, refusal)
    return ModelRequest(
        reference=reference,
        uri=uri,
        mount_path=_mount_path(values.get(MOUNT_PATH)),
        credentials=credentials,
        fallback=cast(Fallback, _choice(FALLBACK, values, ("source", "none")) or "source"),
        mode=cast(Mode | None, _choice(MODE, values, ("csi", "cache", "download"))),
        containers=_containers(values.get(CONTAINERS)),
        placement=cast(
            Placement, _choice(PLACEMENT, values, ("prefer-warm", "require-warm")) or "prefer-warm"
        ),
        size_bytes=_size(values.get(SIZE)),
        warm_memory=_choice(WARM_MEMORY, values, ("true", "false")) != "false",
        verify=verify,
        explicit=frozenset(k for k in values if k in KNOWN),
        unknown=tuple(sorted(k for k in values if k not in KNOWN)),
    )


def parse_quantity(text: str) -> int:
    """A Kubernetes quantity of bytes, rounded up to a whole byte; ValueError if invalid."""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError("is not a Kubernetes quantity (e.g. 15Gi, 500M, 1.5e9)")
    try:
        number = Decimal(match["num"])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise ValueError("is not a number") from e
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        number *= Decimal(1024) ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        number *= Decimal(10) ** _DECIMAL[suffix]
    elif suffix:
        number *= Decimal(10) ** int(suffix[1:])
    if number > MAX_SIZE_BYTES:
        raise ValueError("is larger than any model could be")
    return int(number.to_integral_value(rounding=ROUND_CEILING))


# --- one function per annotation ---------------------------------------------------------


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise AnnotationError(key, "must be a string")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise AnnotationError(key, f"is longer than {MAX_VALUE_BYTES} bytes")
    return value


def _only_include_wrong(uri: str) -> bool:
    try:
        parse(uri)
    except InvalidReference:
        return False
    return True


def _mount_path(value: str | None) -> str:
    if value is None:
        return DEFAULT_MOUNT_PATH
    path = value.strip()
    if not path.startswith("/"):
        raise AnnotationError(MOUNT_PATH, f"{_show(path)} is not an absolute path")
    if len(path) > MAX_MOUNT_PATH:
        raise AnnotationError(MOUNT_PATH, f"is longer than {MAX_MOUNT_PATH} characters")
    if path == "/":
        raise AnnotationError(MOUNT_PATH, "must not be the root directory")
    segments = path[1:].split("/")
    if posixpath.normpath(path) != path or any(s in ("", ".", "..") for s in segments):
        raise AnnotationError(MOUNT_PATH, f"{_show(path)} is not a clean path (no //, . or ..)")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise AnnotationError(
                MOUNT_PATH, f"{_show(path)} has characters other than letters, digits, ._@+~-"
            )
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise AnnotationError(
                MOUNT_PATH, f"{_show(path)} has a segment longer than {MAX_SEGMENT_BYTES} "
                "bytes (a file name's limit)")
    for tree in FORBIDDEN_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise AnnotationError(MOUNT_PATH, f"{_show(path)} is under {tree}, which is reserved")
    if path in FORBIDDEN_EXACT or SIDE_PATH.startswith(path + "/"):
        raise AnnotationError(MOUNT_PATH, f"{_show(path)} would hide a system directory")
    for tree in IMAGE_TREES:
        if path == tree or path.startswith(tree + "/") or tree.startswith(path + "/"):
            raise AnnotationError(
                MOUNT_PATH, f"{_show(path)} would hide {tree}, where the init container's "
                "program lives")
    return path


def _credentials(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.strip()
    if not name or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise AnnotationError(
            CREDENTIALS, f"{_show(name)} is not a Secret name (lowercase DNS-1123 subdomain)"
        )
    return name


def _verify(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_policy_name(value)
    except InvalidReference as e:
        raise AnnotationError(VERIFY, f"{e}; it names the ConfigMap holding the policy") from None


def _containers(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names: list[str] = []
    for item in value.split(","):
        name = item.strip()
        if not _DNS_LABEL.match(name):
            raise AnnotationError(
                CONTAINERS, f"{_show(name)} is not a container name (comma-separated names)"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    try:
        size = parse_quantity(text)
    except ValueError as e:
        raise AnnotationError(SIZE, f"{_show(text)} {e}") from None
    if size <= 0:
        raise AnnotationError(SIZE, "must be more than zero bytes")
    return size


def _choice(key: str, values: Mapping[str, str], allowed: tuple[str, ...]) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    text = value.strip()
    if text not in allowed:
        raise AnnotationError(key, f"{_show(text)} is not one of {', '.join(allowed)}")
    return text


def _show(value: str, limit: int = 64) -> str:
    """A value quoted for a message, cut short so one bad annotation cannot flood it."""
    shown = value if len(value) <= limit else value[:limit] + "..."
    return repr(shown)

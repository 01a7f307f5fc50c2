"""The model reference grammar, shared by the agent, the webhook and the CLI.

A reference is a URI naming where a model lives, plus optional include globs that select
files. Parsing is pure and makes no network call. Every reference has a canonical form and a
**key**: a short hash of that form, so the webhook can name a model's store directory at
admission time, and the agent finds the same directory when it pulls.

Grammar (see DESIGN.md, "Model references"):

    hf://ORG/REPO[@REVISION]                 revision defaults to ``main``
    s3://BUCKET[/PREFIX]
    oci://REGISTRY[:PORT]/REPO[:TAG|@sha256:HEX]   tag defaults to ``latest``
    http(s)://HOST[:PORT]/PATH[?QUERY]
    model-registry://[HOST[:PORT]/]MODEL/VERSION
    file:///ABSOLUTE/PATH
    pvc://CLAIM[/SUBPATH]

This module imports nothing of the agent but its error type: the webhook depends on it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import ipaddress
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, unquote_plus, urlsplit

# The grammar's error types, re-exported: the webhook takes them from here, so that it
# imports nothing of the agent but this module (an import-linter contract).
from common.errors import InvalidInput, InvalidReference, ModelcacheError

SCHEMES = ("hf", "s3", "oci", "http", "https", "model-registry", "file", "pvc")
#: schemes whose content the agent caches (``pvc://`` is mounted, not cached)
CACHED_SCHEMES = tuple(s for s in SCHEMES if s != "pvc")

MAX_URI_LENGTH = 2048
MAX_GLOBS = 64
MAX_GLOB_LENGTH = 256
KEY_HEX = 24
LABEL_PREFIX = "modelcache.io/m-"

_HF_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_HF_REPO = re.compile(rf"^{_HF_PART}(/{_HF_PART})?$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]{0,254}$")
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_OCI_REPO = re.compile(rf"^{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_K8S_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
_REGISTRY_NAME = re.compile(r"^[^\x00-\x1f/]{1,255}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SECRET_QUERY_KEYS = re.compile(r"(?i)(signature|token|credential|secret|pass|key|sig|auth|jwt)")


@dataclass(frozen=True)
class Reference:
    """A parsed, canonical model reference."""

    scheme: str
    #: registry or web host with optional ``:port``; the S3 bucket; the PVC claim;
    #: the model registry's host (empty: the configured default); empty for hf and file
    host: str
    #: repository, object path, key prefix, directory or sub path (no leading slash
    #: except for ``file``)
    path: str
    #: revision as written, with the scheme's default filled in (hf ``main``, oci
    #: ``latest``); a digest for ``oci@sha256:``; the version for model-registry
    revision: str = ""
    #: include globs, stripped, deduplicated and sorted
    include: tuple[str, ...] = field(default=())
    #: the signature policy a pull must pass, as :func:`policy_scope` names it (``NAME``
    #: standalone, ``NAMESPACE/NAME`` in a cluster); empty: none. Part of the key: a model
    #: verified under one policy is never handed to a pull that names another.
    verify: str = ""
    #: the credentials scope, as :func:`credentials_scope` names it: empty for a pull
    #: without credentials (one directory every pod shares), else ``NAMESPACE/SECRET`` in a
    #: cluster (``NAME`` standalone). Part of the key: a model pulled with one namespace's
    #: credentials is a directory of its own, published only after a pull with them.
    credentials: str = ""

    # --- derived -------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The canonical URI (without include globs)."""
        s, h, p, r = self.scheme, self.host, self.path, self.revision
        if s == "hf":
            return f"hf://{p}@{r}"
        if s == "oci":
            sep = "@" if r.startswith("sha256:") else ":"
            return f"oci://{h}/{p}{sep}{r}"
        if s == "model-registry":
            prefix = f"{h}/" if h else ""
            return f"model-registry://{prefix}{quote(p, safe='')}/{quote(r, safe='')}"
        if s == "file":
            return f"file://{p}"
        if s in ("http", "https"):
            return f"{s}://{h}/{p}"
        return f"{s}://{h}/{p}" if p else f"{s}://{h}"

    @property
    def canonical(self) -> str:
        """What the key is computed from: the canonical URI, the include globs, the
        credentials scope and the signature policy (each scope on a line starting with NUL,
        which no glob can hold)."""
        scopes = ((f"\0credentials={self.credentials}",) if self.credentials else ()) \
            + ((f"\0verify={self.verify}",) if self.verify else ())
        return "\n".join((self.uri, *self.include, *scopes))

    @functools.cached_property
    def key(self) -> str:
        """The model's key: the first hex digits of sha256 of the canonical form (computed
        once: indexes look models up by it all the time)."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:KEY_HEX]

    @property
    def node_label(self) -> str:
        """The node label an agent sets to ``ready`` when this model is warm there."""
        return LABEL_PREFIX + self.key[:16]

    @property
    def cached(self) -> bool:
        """Whether the agent caches this reference (everything but ``pvc://``)."""
        return self.scheme in CACHED_SCHEMES

    @property
    def may_unpack(self) -> bool:
        """Whether a pull may unpack an archive (so that the archive and its members are on
        disk at once): an OCI image's tar layers (modelcars), whatever a model registry
        refers to, and an http(s) or file URL that names an archive."""
        if self.scheme in ("oci", "model-registry"):
            return True
        if self.scheme in ("http", "https", "file"):
            return archive_kind(unquote(self.path.split("?", 1)[0])) is not None
        return False

    @property
    def immutable(self) -> bool:
        """Whether the reference names content that can never change."""
        if self.scheme == "hf":
            return re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None
        if self.scheme == "oci":
            return self.revision.startswith("sha256:")
        return False

    @property
    def display(self) -> str:
        """The URI for logs and replies: query values that look like secrets are hidden."""
        if self.scheme not in ("http", "https") or "?" not in self.path:
            return self.uri
        path, _, query = self.path.partition("?")
        parts = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            secret = eq and _SECRET_QUERY_KEYS.search(unquote_plus(name))
            parts.append(f"{name}=REDACTED" if secret else item)
        return f"{self.scheme}://{self.host}/{path}?{'&'.join(parts)}"

    def matches(self, relpath: str) -> bool:
        """Whether a file path (relative, ``/``-separated) is selected by the include globs.

        No globs select everything. A glob is matched against the whole relative path with
        :func:`fnmatch.fnmatchcase` (``*`` also crosses ``/``), and a glob without ``/``
        is also tried against the file's base name.
        """
        if not self.include:
            return True
        base = relpath.rsplit("/", 1)[-1]
        for glob in self.include:
            if fnmatch.fnmatchcase(relpath, glob):
                return True
            if "/" not in glob and fnmatch.fnmatchcase(base, glob):
                return True
        return False

    def with_revision(self, revision: str) -> Reference:
        """The same reference at another revision (used to pin a resolved revision)."""
        return Reference(self.scheme, self.host, self.path, revision, self.include,
                         self.verify, self.credentials)

    def __str__(self) -> str:
        return self.display


# --- parsing ---------------------------------------------------------------------------


def parse(uri: str, include: Iterable[str] | str | None = None, verify: str = "",
          credentials: str = "") -> Reference:
    """Parse a reference; raise :class:`InvalidReference` naming what is wrong. ``verify``
    is a policy scope (:func:`policy_scope`), ``credentials`` a credentials scope
    (:func:`credentials_scope`), both checked here too. A caller that knows a namespace,
    a Secret's name and a policy's name uses :func:`scoped`."""
    if not isinstance(uri, str):
        raise InvalidReference("model URI must be a string")
    uri = uri.strip()
    if not uri:
        raise InvalidReference("model URI is empty")
    if len(uri) > MAX_URI_LENGTH:
        raise InvalidReference(f"model URI is longer than {MAX_URI_LENGTH} characters")
    _check_chars(uri, "model URI")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise InvalidReference(
            f"model URI {uri!r} has no scheme (expected one of {', '.join(SCHEMES)})"
        )
    if scheme not in SCHEMES:
        raise InvalidReference(f"unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    globs = parse_include(include)
    parser = _PARSERS[scheme]
    host, path, revision = parser(scheme, rest)
    if verify:
        namespace, _, name = verify.rpartition("/")
        verify = policy_scope(namespace or None, name)
    if credentials:
        namespace, _, name = credentials.rpartition("/")
        credentials = credentials_scope(namespace or None, name)
    return Reference(scheme, host, path, revision, globs, verify, credentials)


def scoped(uri: str, include: Iterable[str] | str | None = None, *,
           namespace: str | None = None, credentials: str | None = None,
           verify: str | None = None) -> Reference:
    """The reference a caller in ``namespace`` (None standalone) names, with the Secret
    ``credentials`` and the signature policy ``verify`` (names, or None): the one way the
    webhook, the init container, the admin API, the CSI node and the CachedModel
    controller compute a model's key, so that all of them name the same directory."""
    return parse(uri, include,
                 policy_scope(namespace, verify) if verify else "",
                 credentials_scope(namespace, credentials) if credentials else "")

def check_policy_name(name: object) -> str:
    """A signature policy's name (a ConfigMap's in a cluster, a ``verifyPolicies`` key
    standalone): a lowercase DNS-1123 subdomain; raise :class:`InvalidReference` if not."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidReference("verify policy name is empty")
    name = name.strip()
    if len(name) > 253 or not _K8S_NAME.match(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidReference(
            f"verify policy name {shown!r} is not a ConfigMap name (lowercase DNS-1123 "
            "subdomain: a-z, 0-9, '-' and '.')")
    return name


def policy_scope(namespace: str | None, name: str) -> str:
    """How a key names a signature policy: ``NAMESPACE/NAME`` in a cluster (a ConfigMap of
    that namespace: one name in two namespaces is two policies), ``NAME`` standalone."""
    name = check_policy_name(name)
    return f"{_namespace(namespace)}/{name}" if namespace else name


def credentials_scope(namespace: str | None, name: str) -> str:
    """How a key names the credentials of a pull: ``NAMESPACE/SECRET`` in a cluster (a
    Secret of that namespace: one name in two namespaces is two scopes), ``NAME``
    standalone (a directory under the agent's ``--credentials-dir``)."""
    if not isinstance(name, str) or not _K8S_NAME.match(name.strip()) or len(name) > 253:
        shown = str(name)[:64]
        raise InvalidReference(f"credentials {shown!r} is not a Secret name (lowercase "
                               "DNS-1123 subdomain: a-z, 0-9, '-' and '.')")
    return f"{_namespace(namespace)}/{name.strip()}" if namespace else name.strip()


def _namespace(namespace: str) -> str:
    if not _K8S_NAME.match(namespace) or "." in namespace or len(namespace) > 63:
        raise InvalidReference(f"namespace {namespace[:64]!r} is not a valid namespace name")
    return namespace


def parse_include(include: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate include globs (a list, or a comma-separated string as in the annotation)."""
    if include is None:
        return ()
    items = include.split(",") if isinstance(include, str) else list(include)
    if len(items) > MAX_GLOBS:
        raise InvalidReference(f"too many include globs ({len(items)} > {MAX_GLOBS})")
    globs: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise InvalidReference("include globs must be strings")
        glob = item.strip()
        if not glob:
            if isinstance(include, str) and len(items) == 1:
                continue  # an empty annotation selects everything
            raise InvalidReference("include glob is empty")
        if len(glob) > MAX_GLOB_LENGTH:
            raise InvalidReference(f"include glob longer than {MAX_GLOB_LENGTH} characters")
        _check_chars(glob, f"include glob {glob!r}")
        if glob.startswith("/"):
            raise InvalidReference(
                f"include glob {glob!r} is absolute; globs are relative to the model"
            )
        if ".." in glob.split("/"):
            raise InvalidReference(f"include glob {glob!r} contains '..'")
        if glob.count("[") != glob.count("]"):
            raise InvalidReference(f"include glob {glob!r} has an unbalanced '['")
        globs.add(glob)
    return tuple(sorted(globs))


def text_problem(text: str) -> str | None:
    """What makes ``text`` unfit for a reference or a file name (``safe_relpath`` asks
    too), if anything: a control character, or a lone surrogate (bytes that were not
    UTF-8, such as a tar member name decoded with surrogateescape, or a JSON ``"\\udcXX"``
    escape)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "contains a control character"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _check_chars(text: str, what: str) -> None:
    if (problem := text_problem(text)) is not None:
        raise InvalidReference(f"{what} {problem}")


def _parse_hf(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("hf:// reference must not have a query or fragment")
    repo, rev = _split_hf(rest)
    repo = repo.strip("/")
    if not _HF_REPO.match(repo) or ".." in repo or "--" in repo:
        raise InvalidReference(
            f"hf:// repository {repo!r} is not a valid Hugging Face repo id (ORG/NAME)"
        )
    rev = rev or "main"
    if not _HF_REVISION.match(rev) or ".." in rev or rev.endswith("/"):
        raise InvalidReference(f"hf:// revision {rev!r} is not a valid branch, tag or commit")
    return "", repo, rev


def _split_hf(rest: str) -> tuple[str, str]:
    # A revision may itself contain '/' (refs/pr/1), so split at the first '@'.
    repo, sep, rev = rest.partition("@")
    if sep and not rev:
        raise InvalidReference("hf:// reference has an empty revision after '@'")
    return repo, rev


def _parse_s3(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("s3:// reference must not have a query or fragment")
    bucket, _, prefix = rest.partition("/")
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        raise InvalidReference(f"s3:// bucket {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    _check_path_segments(prefix, "s3:// prefix")
    return bucket, prefix, ""


def _parse_oci(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("oci:// reference must not have a query or fragment")
    host, slash, remainder = rest.partition("/")
    if not slash or not remainder:
        raise InvalidReference("oci:// reference needs REGISTRY/REPOSITORY")
    host = _check_host(host, "oci:// registry")
    digest = ""
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        if not _SHA256_DIGEST.match(digest):
            raise InvalidReference(
                f"oci:// digest {digest!r} is not a sha256 digest (sha256: and 64 lowercase hex)"
            )
    repo, tag = remainder, ""
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = remainder.rpartition(":")
        if not _OCI_TAG.match(tag):
            raise InvalidReference(f"oci:// tag {tag!r} is not a valid tag")
    if not _OCI_REPO.match(repo) or len(repo) > 255:
        raise InvalidReference(f"oci:// repository {repo!r} is not a valid repository name")
    return host, repo, digest or tag or "latest"


def _parse_http(scheme: str, rest: str) -> tuple[str, str, str]:
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError as e:  # e.g. an unbalanced '[' in the host
        raise InvalidReference(f"{scheme}:// URI is malformed: {e}") from e
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidReference(
            f"{scheme}:// URI must not carry credentials; put them in the credentials Secret"
        )
    if parts.fragment:
        raise InvalidReference(f"{scheme}:// URI must not have a fragment")
    try:
        port = parts.port
    except ValueError as e:
        raise InvalidReference(f"{scheme}:// URI has an invalid port") from e
    hostname = (parts.hostname or "").lower()
    if not hostname:
        raise InvalidReference(f"{scheme}:// URI has no host")
    shown = f"[{hostname}]" if ":" in hostname else hostname
    if port not in (None, _DEFAULT_PORTS[scheme]):
        shown = f"{shown}:{port}"
    host = _check_host(shown, f"{scheme}:// host")
    path = parts.path.lstrip("/")
    if any(c.isspace() for c in f"{parts.path}?{parts.query}"):
        raise InvalidReference(
            f"{scheme}:// URI contains a space; percent-encode it (%20), as URLs do")
    if not path or path.endswith("/"):
        raise InvalidReference(f"{scheme}:// URI must name a file, not a directory")
    _check_path_segments(unquote(path), f"{scheme}:// path")
    if parts.query:
        path = f"{path}?{parts.query}"
    return host, path, ""


def _parse_registry(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("model-registry:// reference must not have a query or fragment")
    segments = rest.strip("/").split("/")
    if len(segments) == 3:
        host = _check_host(segments[0], "model-registry:// host")
        model, version = segments[1], segments[2]
    elif len(segments) == 2:
        host, (model, version) = "", segments
    else:
        raise InvalidReference("model-registry:// reference must be [HOST[:PORT]/]MODEL/VERSION")
    model, version = unquote(model), unquote(version)
    for what, value in (("model", model), ("version", version)):
        if not _REGISTRY_NAME.match(value):
            raise InvalidReference(f"model-registry:// {what} name {value!r} is not valid")
    return host, model, version


def _parse_file(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("file:// URI must not have a query or fragment")
    host, _, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise InvalidReference("file:// URI must name a local path (file:///PATH)")
    path = "/" + path.lstrip("/")  # normpath would keep a leading "//"
    _check_path_segments(path.strip("/"), "file:// path")
    path = posixpath.normpath(path)
    if path == "/":
        raise InvalidReference("file:// URI must not name the root directory")
    return "", path, ""


def _parse_pvc(scheme: str, rest: str) -> tuple[str, str, str]:
    if "?" in rest or "#" in rest:
        raise InvalidReference("pvc:// reference must not have a query or fragment")
    claim, _, sub = rest.partition("/")
    if not _K8S_NAME.match(claim):
        raise InvalidReference(f"pvc:// claim name {claim!r} is not a valid Kubernetes name")
    sub = sub.strip("/")
    _check_path_segments(sub, "pvc:// sub path")
    return claim, sub, ""


def _check_path_segments(path: str, what: str) -> None:
    if "\x00" in path or "\\" in path:
        raise InvalidReference(f"{what} contains a NUL or backslash")
    for seg in path.split("/"):
        if seg in ("..", "."):
            raise InvalidReference(f"{what} contains {seg!r}")


def _check_host(host: str, what: str) -> str:
    """Validate ``host[:port]``; return it lowercased with IPv6 in brackets."""
    host = host.lower()
    name, port = host, ""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise InvalidReference(f"{what} {host!r} has an unclosed '['")
        name, port = host[1:end], host[end + 1:]
        if port and not port.startswith(":"):
            raise InvalidReference(f"{what} {host!r} is malformed")
        port = port[1:]
    elif host.count(":") > 1:
        name = host
    elif ":" in host:
        name, _, port = host.partition(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise InvalidReference(f"{what} {host!r} has an invalid port")
    if not host.startswith("["):
        try:
            name = ipv4_literal(name) or name  # 127.1, 2130706433, 0x7f.1: 127.0.0.1
        except ValueError as e:
            raise InvalidReference(f"{what} {name!r} {e}") from None
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        if not _HOSTNAME.match(name) or len(name) > 253:
            raise InvalidReference(f"{what} {name!r} is not a valid host name") from None
        return f"{name}:{port}" if port else name
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"{shown}:{port}" if port else shown


def ipv4_literal(host: str) -> str | None:
    """The dotted-quad address a host names in any IPv4 number form that URL parsers and
    ``inet_aton`` accept (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``: each
    127.0.0.1), or None for a host name. A host that ends in a number but is no such
    address (``1.2.3.4.5``, ``10.0.0.256``, ``host.123``) raises ValueError: every client
    would read it as an address, so it is never a name (the WHATWG URL standard's rule).
    One rule for the webhook, the agent and the init container (all parse here)."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot, as in a fully qualified name
    if not parts or not _IPV4_NUMBER.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise ValueError("ends in a number but is not an IPv4 address (more than 4 parts)")
    numbers = []
    for part in parts:
        if not _IPV4_NUMBER.match(part):
            raise ValueError("ends in a number but is not an IPv4 address")
        if part[:2].lower() == "0x":
            numbers.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not all(c in "01234567" for c in part):
                raise ValueError(f"ends in a number but {part!r} is not an octal number")
            numbers.append(int(part, 8))
        else:
            numbers.append(int(part))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("ends in a number but is out of the IPv4 range")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


_IPV4_NUMBER = re.compile(r"^(?:0[xX][0-9A-Fa-f]*|[0-9]+)$")

_PARSERS = {
    "hf": _parse_hf,
    "s3": _parse_s3,
    "oci": _parse_oci,
    "http": _parse_http,
    "https": _parse_http,
    "model-registry": _parse_registry,
    "file": _parse_file,
    "pvc": _parse_pvc,
}


def archive_kind(name: str) -> str | None:
    """The archive kind a file name announces (``tar``, ``tar.gz``, ``tar.zst``, ``zip``),
    if any: such a file is unpacked, not kept."""
    lower = name.lower()
    for suffix, kind in ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar.zst", "tar.zst"),
                         (".tar", "tar"), (".zip", "zip")):
        if lower.endswith(suffix):
            return kind
    return None


def key_of(uri: str, include: Iterable[str] | str | None = None) -> str:
    """Shorthand: the key of a reference given as text."""
    return parse(uri, include).key


def split_host_port(host: str, default_port: int) -> tuple[str, int]:
    """Split a canonical ``host[:port]`` (IPv6 in brackets) into a name and a port."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") else default_port
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return host, default_port


__all__ = [
    "CACHED_SCHEMES", "KEY_HEX", "LABEL_PREFIX", "SCHEMES", "InvalidInput", "InvalidReference",
    "ModelcacheError", "Reference", "archive_kind", "check_policy_name", "credentials_scope",
    "ipv4_literal", "key_of", "parse", "parse_include", "policy_scope", "scoped", "split_host_port",
]

"""One error hierarchy for modelcache.

Foreign exceptions (aiohttp, OSError, botocore, ...) are translated into these at the
boundary where they happen (``raise ... from e``). HTTP status codes are chosen only at
the edge (the admin API), from the class, never inside the core.

Every message must name what was wrong and must never contain a secret.
"""

from __future__ import annotations


class ModelcacheError(Exception):
    """Base of every error modelcache raises on purpose."""

    #: a short, bounded label used as the ``reason`` of failure metrics
    reason: str = "error"


# --- input ---------------------------------------------------------------------------------


class InvalidInput(ModelcacheError):
    """Bad input from a user or a caller (a request body, a flag, a config file)."""

    reason = "invalid"


class InvalidReference(InvalidInput):
    """A model reference (URI, include globs) that the grammar does not accept."""

    reason = "invalid_reference"


class UnsafeName(InvalidInput):
    """A file name from a listing, manifest or archive that could escape its directory."""

    reason = "unsafe_name"


class PolicyError(InvalidInput):
    """A signature-verification policy that is missing, malformed or unusable (its key,
    certificate chain or trust root); the message names the policy."""

    reason = "verify_policy"


class ArchiveRejected(InvalidInput):
    """An archive that is malformed, too large, too compressed or holds forbidden members."""

    reason = "archive"


# --- policy --------------------------------------------------------------------------------


class NotAllowed(ModelcacheError):
    """A source, host, address or path that the admin's allowlist does not permit."""

    reason = "not_allowed"


class Unauthorized(ModelcacheError):
    """A caller without valid credentials (no token, wrong token)."""

    reason = "unauthorized"


class Forbidden(ModelcacheError):
    """A caller whose credentials are valid but do not grant this action."""

    reason = "forbidden"


# --- sources -------------------------------------------------------------------------------


class SourceError(ModelcacheError):
    """A model source answered with something we cannot use."""

    reason = "source"


class SourceNotFound(SourceError):
    """The model, revision or file does not exist at the source."""

    reason = "not_found"


class SourceAuthError(SourceError):
    """The source refused our credentials (401/403)."""

    reason = "auth"


class TransientError(SourceError):
    """A failure worth retrying: reset, timeout, 5xx, 429, short body."""

    reason = "transient"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: seconds the server asked us to wait (``Retry-After``), if it said
        self.retry_after = retry_after


class TLSUntrusted(SourceError):
    """A source's TLS certificate that the agent does not trust (not retried: it will not
    change by itself)."""

    reason = "tls"


class IntegrityError(SourceError):
    """Downloaded bytes do not match the size or digest the source stated."""

    reason = "integrity"


class VerificationFailed(ModelcacheError):
    """A model whose signature does not verify under the policy its pull named (no
    signature, a signature by another signer, files that differ from the signed ones)."""

    reason = "verification"


class Unsigned(VerificationFailed):
    """A model that a policy requires to be signed and that holds no signature file."""

    reason = "unsigned"


# --- store ---------------------------------------------------------------------------------


class StoreError(ModelcacheError):
    """The local store could not do what was asked."""

    reason = "store"


class Locked(StoreError):
    """Another writer holds the ingest lock of this ref."""

    reason = "locked"


class NoSpace(StoreError):
    """The store's filesystem or quota has no room for this pull."""

    reason = "no_space"


class NotFound(ModelcacheError):
    """A model or blob the caller named is not in the store."""

    reason = "not_found"


class Conflict(ModelcacheError):
    """The action conflicts with the current state (a model in use, a pull running)."""

    reason = "conflict"


class NotReady(ModelcacheError):
    """A model that is not ready yet (still being pulled, or its pull failed and runs again):
    asking again later is the answer."""

    reason = "not_ready"


class ShuttingDown(ModelcacheError):
    """The agent is stopping and takes no new work."""

    reason = "shutdown"


# --- Kubernetes API ------------------------------------------------------------------------


class KubeError(ModelcacheError):
    """The Kubernetes API refused a request of the agent's own (its RBAC, an object it built):
    a deployment or programming error, not the caller's. Not found, conflicts and transient
    failures of the API are ``NotFound``, ``Conflict`` and ``TransientError``."""

    reason = "kube"

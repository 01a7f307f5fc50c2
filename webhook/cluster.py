"""A small client of the Kubernetes API over plain aiohttp, for the webhook only.

The webhook may not import ``kubernetes_asyncio`` (only ``agent/kube.py`` does, by contract)
nor any agent module but the reference grammar, and it needs two things of the API: a
watch on namespaces and, for ``modelcache webhook certs``, one patch of its
MutatingWebhookConfiguration. Configuration is found like controller-runtime's
``GetConfig``: ``$KUBECONFIG`` (only that file), else the in-cluster service account, else
``~/.kube/config``. A kubeconfig user may carry a token, a token file or a client
certificate; exec and auth-provider plugins are not run (no cluster access, said once).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from common.reference import ModelcacheError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_EVENT_BYTES = 16 * 1024 * 1024


class ClusterError(ModelcacheError):
    """The Kubernetes API answered with an error, or could not be configured."""

    reason = "kube_api"

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Gone(ClusterError):
    """410: the resourceVersion we watch from is too old; list again."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    source: str
    """``in-cluster`` or ``kubeconfig <path>``: for the log, never a secret."""
    ca_file: str | None = None
    ca_data: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def bearer(self) -> str | None:
        """The current token (a token file is re-read: bound tokens rotate)."""
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token


def find_config(
    env: Mapping[str, str], home: Path | None = None
) -> tuple[ClusterConfig | None, str]:
    """The cluster configuration, or None and why there is none."""
    if env.get("KUBECONFIG"):
        path = Path(env["KUBECONFIG"].split(os.pathsep)[0])
        if not path.is_file():
            return None, f"KUBECONFIG file {path} does not exist"
        return _from_kubeconfig(path)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if host and port and (SA_DIR / "token").is_file():
        shown = f"[{host}]" if ":" in host else host
        return ClusterConfig(
            server=f"https://{shown}:{port}", source="in-cluster",
            ca_file=str(SA_DIR / "ca.crt"), token_file=str(SA_DIR / "token"),
        ), ""
    default = (home or Path.home()) / ".kube" / "config"
    if default.is_file():
        return _from_kubeconfig(default)
    return None, "no in-cluster service account and no kubeconfig"


def _from_kubeconfig(path: Path) -> tuple[ClusterConfig | None, str]:
    try:
        doc = yaml.safe_load(path.read_text())
        contexts = {c["name"]: c["context"] for c in doc.get("contexts") or []}
        context = contexts[doc["current-context"]]
        cluster = {c["name"]: c["cluster"] for c in doc["clusters"]}[context["cluster"]]
        users = {u["name"]: u.get("user") or {} for u in doc.get("users") or []}
        user = users.get(context.get("user"), {})
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        return None, f"kubeconfig {path} is not usable ({type(e).__name__})"
    if "exec" in user or "auth-provider" in user:
        return None, f"kubeconfig {path} needs an auth plugin, which the webhook does not run"
    base = path.parent
    return ClusterConfig(
        server=str(cluster["server"]).rstrip("/"),
        source=f"kubeconfig {path}",
        ca_file=_file(base, cluster.get("certificate-authority")),
        ca_data=_decoded(cluster.get("certificate-authority-data")),
        token=user.get("token"),
        token_file=_file(base, user.get("tokenFile")),
        cert_file=_file(base, user.get("client-certificate"))
        or _private_file(user.get("client-certificate-data")),
        key_file=_file(base, user.get("client-key"))
        or _private_file(user.get("client-key-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    ), ""


def _file(base: Path, value: object) -> str | None:
    return str(base / str(value)) if value else None


def _decoded(value: object) -> str | None:
    return base64.b64decode(str(value)).decode() if value else None


def _private_file(value: object) -> str | None:
    """Inline key material written where only we can read it (ssl wants files)."""
    if not value:
        return None
    fd, name = tempfile.mkstemp(prefix="modelcache-kube-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(str(value)))
    return name


class KubeApi:
    """JSON requests and watch streams against one API server."""

    def __init__(self, config: ClusterConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self._ssl = config.ssl_context()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None,
        body: object = None, content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        async with self.session.request(
            method, self.config.server + path, params=params, data=data, ssl=self._ssl,
            headers=self._headers(content_type if data is not None else None),
        ) as response:
            payload = await response.read()
            if response.status >= 400:
                raise _error(response.status, payload, f"{method} {path}")
            result: dict[str, Any] = json.loads(payload)
            return result

    async def watch(
        self, path: str, params: Mapping[str, str], idle_seconds: float = 360,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch, one dict each; :class:`Gone` on a 410 in any form.

        A stream silent for ``idle_seconds`` (longer than the server's own watch timeout)
        is a dead connection: the read times out and the caller reconnects.
        """
        query = {**params, "watch": "1"}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=idle_seconds)
        async with self.session.get(
            self.config.server + path, params=query, ssl=self._ssl, headers=self._headers(),
            timeout=timeout,
        ) as response:
            if response.status >= 400:
                raise _error(response.status, await response.read(), f"watch {path}")
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                if len(buffer) > MAX_EVENT_BYTES:
                    raise ClusterError(f"watch {path}: event over {MAX_EVENT_BYTES} bytes")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _event(line, path)


def _event(line: bytes, path: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as e:
        raise ClusterError(f"watch {path}: a line that is not JSON") from e
    if not isinstance(event, dict):
        raise ClusterError(f"watch {path}: an event that is not an object")
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        code = int(status.get("code") or 0)
        message = str(status.get("message") or "error event")
        if code == 410:
            raise Gone(f"watch {path}: {message}", 410)
        raise ClusterError(f"watch {path}: {message}", code)
    return event


def _error(status: int, payload: bytes, what: str) -> ClusterError:
    try:
        message = str(json.loads(payload).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    text = f"{what}: HTTP {status}" + (f": {message[:200]}" if message else "")
    return Gone(text, status) if status == 410 else ClusterError(text, status)

"""nginx serving a directory on loopback, as production web servers serve model files.

Static files get ``Range`` (206), ``ETag`` and ``Last-Modified`` exactly as nginx does
them; ``redirects`` adds exact-match locations answering a redirect to any URL (another
loopback port, a link-local metadata address, ...) for redirect-policy tests. Optional
TLS with a certificate from a ``trustme`` CA, and optional basic auth (``users``: nginx's own
``auth_basic`` over an htpasswd file of salted SHA-1 entries, 401 without or with wrong
credentials). The config, pid file, logs and temp dirs all
live in a work directory; the process runs in the foreground (``daemon off``) and is
stopped by PID.

    with start_nginx(root, workdir) as srv:
        srv.url("model.safetensors")
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.servers.net import LOOPBACK, answers, free_port, tls_client_context
from tests.servers.proc import ManagedProcess

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_SAFE_LOCATION = re.compile(r"^/[^\s\"';{}\\]*$")
_SAFE_URL = re.compile(r"^[^\s\"';{}\\]+$")


@dataclass
class NginxServer:
    """A running nginx: ``url(path)`` for files under ``root``."""

    root: Path
    host: str
    port: int
    process: ManagedProcess
    workdir: Path
    ca: trustme.CA | None = None
    redirects: Mapping[str, str] = field(default_factory=dict)
    users: Mapping[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.ca is not None else "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, path: str = "") -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    @property
    def access_log(self) -> Path:
        """One line per request: ``$request $status $body_bytes_sent "$http_range"``."""
        return self.workdir / "access.log"

    def requests(self) -> list[str]:
        """Access log lines so far (nginx writes them when each request ends)."""
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class ServedDir:
    """A directory whose files a server serves under ``base_url``."""

    path: Path
    base_url: str

    def url(self, name: str = "") -> str:
        return f"{self.base_url}/{name.lstrip('/')}"


def _config(
    *,
    root: Path,
    workdir: Path,
    host: str,
    port: int,
    cert: Path | None,
    key: Path | None,
    redirects: Mapping[str, str],
    redirect_status: int,
    htpasswd: Path | None,
) -> str:
    # running as root, workers would drop to "nobody" and could not read a 0700 tmp dir
    user = "user root root;" if os.geteuid() == 0 else ""
    tls = ""
    listen = f"{host}:{port}"
    if cert is not None and key is not None:
        listen += " ssl"
        tls = f"ssl_certificate {cert};\n        ssl_certificate_key {key};"
    auth = f'auth_basic "modelcache test"; auth_basic_user_file {htpasswd};' if htpasswd else ""
    locations = []
    for path, target in redirects.items():
        if not _SAFE_LOCATION.match(path) or not _SAFE_URL.match(target):
            raise ValueError(f"unsafe redirect for nginx config: {path!r} -> {target!r}")
        locations.append(f'location = "{path}" {{ return {redirect_status} "{target}"; }}')
    temp = {
        name: workdir / "tmp" / name
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    for d in temp.values():
        d.mkdir(parents=True, exist_ok=True)
    return f"""
{user}
worker_processes 2;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
    default_type application/octet-stream;
    log_format brief '$request $status $body_bytes_sent "$http_range"';
    access_log {workdir / "access.log"} brief;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    server {{
        listen {listen};
        server_name _;
        {tls}
        {auth}
        root {root};
        etag on;
        autoindex off;
        location = /__ready {{ return 204; }}
        {"        ".join(locations)}
    }}
}}
"""


def start_nginx(
    root: Path,
    workdir: Path,
    *,
    tls: trustme.CA | None = None,
    redirects: Mapping[str, str] | None = None,
    redirect_status: int = 302,
    users: Mapping[str, str] | None = None,
    host: str = LOOPBACK,
    attempts: int = 3,
) -> NginxServer:
    """Start nginx serving ``root``; its files (config, logs, pid) go under ``workdir``.

    ``redirects`` maps exact request paths to ``Location`` values. With ``tls`` the server
    presents a certificate for 127.0.0.1 and localhost issued by that CA. With ``users``
    (name -> password) every file needs basic auth.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd = None
    if users:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text("".join(f"{name}:{_ssha(password)}\n"
                                    for name, password in users.items()))
    cert = key = None
    if tls is not None:
        leaf = tls.issue_cert(host, "localhost", "127.0.0.1")
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
    probe_tls = None
    if tls is not None:
        probe_tls = tls_client_context(tls.cert_pem.bytes())
    last: Exception | None = None
    for attempt in range(attempts):
        port = free_port(host)
        conf = workdir / "nginx.conf"
        conf.write_text(
            _config(
                root=root.resolve(),
                workdir=workdir.resolve(),
                host=host,
                port=port,
                cert=cert,
                key=key,
                redirects=redirects or {},
                redirect_status=redirect_status,
                htpasswd=htpasswd.resolve() if htpasswd else None,
            )
        )
        proc = ManagedProcess(
            [NGINX, "-p", workdir, "-e", workdir / "error.log", "-c", conf],
            name=f"nginx-{attempt}",
            log_dir=workdir,
        ).start()
        try:
            proc.wait_ready(functools.partial(answers, host, port, "/__ready", probe_tls, (204,)),
                            timeout=10, what="nginx ready")
        except RuntimeError as e:
            last = e
            continue
        return NginxServer(
            root=root,
            host=host,
            port=port,
            process=proc,
            workdir=workdir,
            ca=tls,
            redirects=dict(redirects or {}),
            users=dict(users or {}),
        )
    raise RuntimeError(f"nginx failed {attempts} times") from last


def _ssha(password: str) -> str:
    """An htpasswd entry nginx reads (RFC 2307 ``{SSHA}``: salted SHA-1)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


@contextmanager
def nginx_server(root: Path, workdir: Path, **kwargs: object) -> Iterator[NginxServer]:
    """:func:`start_nginx` as a context manager (stopped by PID on exit)."""
    srv = start_nginx(root, workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()

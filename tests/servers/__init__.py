"""Real servers (and faithful fakes where none can run here) for modelcache's tests.

Everything binds 127.0.0.x on a free port, keeps its data under the test's temporary
directory, is polled for readiness (never slept on), and is stopped by whoever started it:
processes by PID (SIGTERM, then SIGKILL after 5 s), in-process servers by joining their
thread. The pytest fixtures over these live in ``tests/conftest.py``; an autouse check
there fails any test that leaves a child process or a server thread behind.

Real programs, run as processes:

- ``nginx``: ``nginx`` serving a directory as production web servers do (``Range``,
  ``ETag``, ``Last-Modified``), optional TLS (``trustme``) and redirect locations to any
  URL (another port, ``169.254.169.254``). Also what ``bench/pull.py`` serves from.
- ``registry``: the Debian ``docker-registry`` (distribution 2.8), anonymous, htpasswd
  basic auth (bcrypt), TLS, or bearer tokens from :class:`registry.TokenServer` (a JWT
  issuer distribution really verifies; its realm can be another host). Pushes by
  ``skopeo copy`` from an OCI layout (digests preserved), by ``oras-py``, or by plain HTTP
  for hostile manifests. ``registry.serve_image`` serves what distribution refuses to store.
- ``s3``: ``moto`` (fast, any credentials) and SeaweedFS ``weed mini`` (real SigV4),
  with ``upload_model`` (multipart objects, ``x-amz-checksum-sha256``).

aiohttp servers, run in a thread (``aioserver.AppThread``) so sync tests, async tests of
any loop scope and agent subprocesses can all use them:

- ``faulty``: a file server with per-path programmable faults (resets, short bodies,
  wrong ``Content-Range``, 503/429 storms with ``Retry-After``, slow or held bytes,
  redirects, corruption) and a log of every request and byte sent; its ``respond`` engine
  serves the hub's and the static registry's bodies too.
- ``hfhub``: a Hugging Face Hub-compatible API (revisions, paginated trees, resolve with
  ``X-Repo-Commit`` / ``X-Linked-Etag`` / ranges, LFS redirects to a CDN on another host
  that rejects forwarded tokens, private repos, 429 injection, hostile entries). Proven
  faithful by the real ``huggingface_hub.snapshot_download`` (``test_hfhub.py``).
- ``modelregistry``: the Kubeflow Model Registry REST API (``v1alpha3`` and ``v1``),
  proven faithful by the real ``model-registry`` client (``test_modelregistry.py``).

Content builders: ``oci`` (artifacts titled per file, modelcar images with tar / gzip /
zstd layers, indexes, hostile tars and manifests, OCI layouts). Plumbing: ``net`` (free
ports, polling, ``fetch``), ``proc`` (managed child processes).
"""

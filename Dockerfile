# syntax=docker/dockerfile:1
#
# modelcache: one image, one entrypoint, two programs.
#   modelcache agent --store /var/lib/modelcache --listen 0.0.0.0:9400   (DaemonSet)
#   modelcache webhook --listen 0.0.0.0:8443 --tls-cert ... --tls-key ...  (Deployment)
#
# Build and push (docs/operators.md, "Build and push the image"):
#   docker build -t ghcr.io/modelcache/modelcache:0.1.0 .
#   docker push ghcr.io/modelcache/modelcache:0.1.0
#
# Dependencies come only from the hash-locked files (pip --require-hashes), regenerated with
#   pip-compile --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
#       --output-file requirements.lock pyproject.toml
#   pip-compile --generate-hashes --allow-unsafe --only-build-deps --all-build-deps \
#       --no-emit-index-url --no-emit-find-links --output-file requirements-build.lock pyproject.toml
#
# Health: no HEALTHCHECK, Kubernetes probes the programs themselves (deploy/base):
#   agent   GET http://:9400/healthz (alive), GET /readyz (store recovered, accepting work)
#   webhook GET https://:8443/healthz, /readyz (on its TLS port)
# Under plain Docker: --health-cmd 'python -c "import urllib.request as u;
#   u.urlopen(\"http://127.0.0.1:9400/healthz\", timeout=2)"'

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The runtime environment: locked dependencies only, wheels only, every file hash checked.
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/modelcache \
 && /opt/modelcache/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        --requirement requirements.lock

# modelcache itself, built as a wheel with the locked build backend, installed without deps.
COPY pyproject.toml README.md* ./
COPY common ./common
COPY agent ./agent
COPY webhook ./webhook
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes --requirement requirements-build.lock \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist . \
 && /opt/modelcache/bin/pip install --no-cache-dir --no-deps /dist/modelcache-*.whl \
 && /opt/modelcache/bin/modelcache --help > /dev/null


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="modelcache" \
      org.opencontainers.image.description="Node-level model cache for Kubernetes: agent and admission webhook" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/modelcache/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Non-root by default (65532, the conventional "nonroot" id). The agent's DaemonSet hands it
# the hostPath store with a one-shot chown; nothing here needs root at run time.
RUN groupadd --system --gid 65532 modelcache \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin modelcache

COPY --from=build /opt/modelcache /opt/modelcache

USER 65532:65532
WORKDIR /
EXPOSE 9400 8443
ENTRYPOINT ["modelcache"]
CMD ["--help"]

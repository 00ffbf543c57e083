# The gateway's container image. Build:   docker build -t exchange-room-gateway:0.1.0 .
# Behind a TLS-inspecting proxy, give the build the proxy's CA bundle (PEM) as a build secret; it is used by pip in
# the build stage only and never stored in a layer:
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/corp-ca.pem -t exchange-room-gateway:0.1.0 .
# (podman/buildah: the same --secret flag.) README "Running it in a container" has the docker run walk-through.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with the gateway and its dependencies (wheels; no compiler reaches the image) --
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
SHELL ["/bin/sh", "-eu", "-c"]
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    python -m venv /opt/gateway; \
    /opt/gateway/bin/pip install --no-cache-dir . ; \
    /opt/gateway/bin/pip uninstall --yes pip setuptools wheel >/dev/null 2>&1 || true

# -- the image: the venv, a fixed non-root user, state on one volume, nothing writable elsewhere -----------------
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="exchange-room-gateway" \
      org.opencontainers.image.description="Self-hosted gateway that relays on-premise Exchange meeting-room calendars to cloud booking systems" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/exchange-gateway/exchange-room-gateway"

# Container defaults, each an ordinary setting (config/README.md): the mounted file may leave them out, and
# `-e GATEWAY_...=` changes them. The API listens on every interface so a published port reaches it; off loopback
# every /v1 call and /metrics need an API key (`gateway api-keys create NAME --scope read|metrics`).
ENV PATH=/opt/gateway/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    GATEWAY_LOG_FORMAT=json \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_API__HOST=0.0.0.0 \
    GATEWAY_API__PORT=8088 \
    GATEWAY_STORE__PATH=/var/lib/gateway/gateway.sqlite \
    GATEWAY_VAULT__PATH=/var/lib/gateway/credentials.vault \
    GATEWAY_VAULT__KEY_FILE=/run/secrets/vault-key

RUN groupadd --gid 10001 gateway \
    && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/gateway --no-create-home \
       --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY config/container.yaml /etc/gateway/gateway.yaml

USER 10001:10001
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 8088
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_API__PORT', '8088'), timeout=4)"]
ENTRYPOINT ["gateway"]
CMD ["run"]

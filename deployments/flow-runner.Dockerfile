# The image a Kubernetes work pool runs the flow in: this project (its locked Python environment), helm and git.
#   docker build -f deployments/flow-runner.Dockerfile --build-arg HELM_SHA256=<sha256 of the helm archive> \
#     -t <registry>/buildkit-pipeline-flow:<commit> .
# HELM_SHA256 is the value get.helm.sh publishes in helm-<version>-linux-<arch>.tar.gz.sha256sum; the build
# refuses to continue without it. Pin the base image by digest (docker buildx imagetools inspect) before
# production use. Not built by this repository's tests.
FROM python:3.11.13-slim-bookworm

ARG HELM_VERSION=v4.1.4
ARG HELM_SHA256
ARG TARGETARCH=amd64

RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN test -n "$HELM_SHA256" || { echo "--build-arg HELM_SHA256=<sha256 of helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz> is required" >&2; exit 1; } \
 && curl -fsSLo /tmp/helm.tgz "https://get.helm.sh/helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz" \
 && echo "${HELM_SHA256}  /tmp/helm.tgz" | sha256sum -c - \
 && tar -xzf /tmp/helm.tgz -C /tmp "linux-${TARGETARCH}/helm" \
 && install -m 0755 "/tmp/linux-${TARGETARCH}/helm" /usr/local/bin/helm \
 && rm -rf /tmp/helm.tgz "/tmp/linux-${TARGETARCH}" \
 && helm version --short

# uv, the version the lock file was written with; `--frozen` installs exactly uv.lock.
RUN pip install --no-cache-dir uv==0.13.9

ENV BUILDKIT_PIPELINE_HOME=/opt/buildkit-pipeline \
    BUILDKIT_PIPELINE_CACHE=/var/cache/buildkit-pipeline \
    UV_PROJECT_ENVIRONMENT=/opt/buildkit-pipeline/.venv \
    PATH=/opt/buildkit-pipeline/.venv/bin:$PATH
WORKDIR /opt/buildkit-pipeline
COPY pyproject.toml uv.lock README.md ./
COPY flows ./flows
COPY blocks ./blocks
COPY deployments ./deployments
COPY sandbox ./sandbox
COPY prefect.yaml ./
RUN uv sync --frozen --no-dev \
 && useradd --uid 10001 --create-home flow \
 && mkdir -p "$BUILDKIT_PIPELINE_CACHE" && chown flow "$BUILDKIT_PIPELINE_CACHE"
USER 10001

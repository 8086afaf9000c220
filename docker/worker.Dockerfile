# syntax=docker/dockerfile:1
#
# EMC's GPU worker image: a Prefect process worker on the `emc-process` pool. It runs EMC's flows
# as subprocesses of this container, with the store, models and caches on the volume at /data.
# The same image runs the compose `setup` service, the `cli` service and, on the `emc-docker`
# pool, one container per flow run (prefect.yaml: code in /opt/emc, data on `emc-data`).
#
# Build from the repository root (compose does: context `..`):
#   docker build -f docker/worker.Dockerfile -t emc-worker:0.1.0 .
# BuildKit reads docker/worker.Dockerfile.dockerignore for this build's context.
#
# CUDA: torch 2.13.0's Linux wheels are CUDA 13.0 builds and bring their own CUDA user-space
# libraries (cuBLAS, cuDNN, NCCL, ...) as pip packages, so the base is NVIDIA's small `base`
# flavour (CUDA runtime, driver hooks for the NVIDIA container toolkit), not `cudnn-runtime`,
# which would ship those libraries twice. Hosts need a driver that supports CUDA 13.0 (580+).

############################################################################################
# build: a virtual environment with torch (CUDA 13.0) and EMC, copied whole into the runtime.
FROM nvidia/cuda:13.0.2-base-ubuntu22.04 AS build

ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04's python3.11 (jammy-updates). Versions are not pinned: the archive replaces them
# with security updates, so an exact pin stops building; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment, then torch first, from PyTorch's CUDA 13.0 index
# (https://download.pytorch.org/whl/cu130), in its own layer: the largest, and it changes least.
# EMC pins torch==2.13.0; the +cu130 build satisfies that pin, so the EMC install below keeps it.
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/cu130 \
        --extra-index-url https://pypi.org/simple \
        torch==2.13.0+cu130

# EMC itself, no dev extras: only what `pip install .` needs to build it.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY emc/ emc/
COPY flows/ flows/
# -P: import what was installed, not the source in this directory.
RUN pip install --no-cache-dir . \
    && python -P -c "import emc, flows.pipeline, torch; print(emc.__version__, torch.__version__)"

############################################################################################
# runtime
FROM nvidia/cuda:13.0.2-base-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# Same reason as above for unpinned versions (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# One non-root user, with the same uid as the dashboard image's: both write the DuckDB file on
# the shared volume (the worker its results, the dashboard's Review page the reviews).
RUN groupadd --gid 10001 emc \
    && useradd --no-log-init --uid 10001 --gid emc --create-home --shell /usr/sbin/nologin emc \
    && mkdir -p /data \
    && chown emc:emc /data

COPY --from=build /opt/venv /opt/venv
# The project directory that `prefect deploy` runs from (compose `setup`) and that deployments
# run in (`set_working_directory: /opt/emc`): prefect.yaml and the flow entrypoints. The emc
# package itself is installed in /opt/venv. Owned by root: flows cannot change their own code.
WORKDIR /opt/emc
COPY prefect.yaml ./
COPY flows/ flows/

ARG EMC_REVISION=unknown
LABEL org.opencontainers.image.title="emc-worker" \
      org.opencontainers.image.description="EMC GPU worker: Prefect process worker on emc-process" \
      org.opencontainers.image.revision="${EMC_REVISION}"

# No secrets here: OPENAI_API_KEY and PREFECT_API_URL come from the environment at run time.
# HF_HUB_OFFLINE=1: hub references resolve only from the cache on the volume (HF_HOME), and
# circuit-tracer's transcoder cache is on the volume too.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMC_DATA_DIR=/data \
    PREFECT_HOME=/data/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/data/hf \
    CIRCUIT_TRACER_CACHE_DIR=/data/circuit-tracer

USER 10001:10001
VOLUME ["/data"]
# The worker's own health endpoint (`--with-healthcheck`), for the HEALTHCHECK; not published.
EXPOSE 8080

# Healthy while the worker keeps polling the Prefect API (its /health answers 503 otherwise).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", \
         "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=5)"]

# A process worker: each flow run is a subprocess of this container, in /opt/emc. It needs
# PREFECT_API_URL (compose sets it). It stops only on a second SIGTERM (see compose.yaml).
CMD ["prefect", "worker", "start", "--pool", "emc-process", "--type", "process", \
     "--with-healthcheck"]

# syntax=docker/dockerfile:1
#
# EMC's dashboard image: Streamlit on port 8501, on the store in /data (the shared volume).
# Build from the repository root (compose does: context `..`):
#   docker build -f docker/dashboard.Dockerfile -t emc-dashboard:0.1.0 .
# BuildKit reads docker/dashboard.Dockerfile.dockerignore for this build's context.
#
# torch is needed: the Review page imports emc.pivotal (divergence, logits), which imports torch.
# The CPU wheel keeps the image small; the dashboard never runs a model.

############################################################################################
# build: a virtual environment with CPU torch and EMC, copied whole into the runtime.
FROM python:3.11.13-slim-bookworm AS build

# A virtual environment, then torch first, from PyTorch's CPU index
# (https://download.pytorch.org/whl/cpu), in its own layer: the largest, and it changes least.
# EMC pins torch==2.13.0; the +cpu build satisfies that pin, so the EMC install below keeps it.
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple \
        torch==2.13.0+cpu

# EMC itself, no dev extras.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY emc/ emc/
COPY flows/ flows/
# -P: import what was installed, not the source in this directory.
RUN pip install --no-cache-dir . \
    && python -P -c "import emc.store, emc.pivotal.review, streamlit; print(emc.__version__)"

############################################################################################
# runtime
FROM python:3.11.13-slim-bookworm

# The same non-root uid as the worker image: both write the DuckDB file on the shared volume.
RUN groupadd --gid 10001 emc \
    && useradd --no-log-init --uid 10001 --gid emc --create-home --shell /usr/sbin/nologin emc \
    && mkdir -p /data \
    && chown emc:emc /data

COPY --from=build /opt/venv /opt/venv
# The dashboard is not part of the installed package: app.py puts /opt/emc on sys.path and
# imports its pages from /opt/emc/dashboard; emc comes from /opt/venv.
WORKDIR /opt/emc
COPY dashboard/ dashboard/

ARG EMC_REVISION=unknown
LABEL org.opencontainers.image.title="emc-dashboard" \
      org.opencontainers.image.description="EMC dashboard: Streamlit on the store in /data" \
      org.opencontainers.image.revision="${EMC_REVISION}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMC_DATA_DIR=/data \
    STREAMLIT_SERVER_FILE_WATCHER_TYPE=none

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8501

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", \
         "import urllib.request as u; u.urlopen('http://localhost:8501/_stcore/health', timeout=5)"]

# Read-write on /data: the Review page saves reviews into the store (through EMC's retrying
# writer); every other page reads through short read-only connections.
CMD ["streamlit", "run", "dashboard/app.py", "--server.address", "0.0.0.0", \
     "--server.port", "8501", "--server.headless", "true", "--browser.gatherUsageStats", "false"]

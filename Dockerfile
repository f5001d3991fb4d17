# syntax=docker/dockerfile:1.7
# qwen-serve image: one image for both compose services (`worker`, `server`); see docs/OPERATIONS.md.
#
#   docker build -t qwen-serve .                          # model fetched on first start into the cache volume
#   docker build -t qwen-serve --build-arg BAKE_MODEL=1 . # default model baked into the image
#
# Stage 1 (devel) compiles the CUDA kernels into one fatbin and builds PyCUDA (no wheel on PyPI) against
# nvcc; stage 2 (runtime, no compiler) gets the venv and the source tree at the same paths, so the editable
# install and the fatbin path stay valid.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PyCUDA links against libcuda; the driver is only there at run time, the stub is enough to link.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first (pyproject's list + the cuda extra, read from pyproject itself), so that a source
# change does not rebuild PyCUDA.
# README.md* : the glob keeps the build working before a README exists (pyproject names it).
COPY pyproject.toml Makefile README.md* ./
COPY clients/python/pyproject.toml clients/python/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["cuda"]))' > /tmp/requirements.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY proto proto
COPY cuda cuda
COPY gpu_worker gpu_worker
COPY server server
COPY clients/python clients/python
# `.installed` tells the Makefile that the venv is ready, so `make stubs kernels` only generates and compiles.
RUN /opt/venv/bin/pip install -e '.[cuda]' --config-settings editable_mode=compat \
    && /opt/venv/bin/pip install -e clients/python --config-settings editable_mode=compat \
    && touch /opt/venv/.installed \
    && make stubs kernels VENV=/opt/venv \
    && test -f cuda/build/qwen_kernels.fatbin

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG BAKE_MODEL=0
# No pip cache: the default model arrives as ~470 MiB of wheels that would otherwise be kept twice.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/qwen \
    XDG_CACHE_HOME=/home/qwen/.cache \
    QWEN_SERVE_HOST=0.0.0.0 \
    QWEN_SERVE_PORT=50051
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
# Fixed uid/gid so that bind-mounted caches can be chowned from the host. The cache and socket dirs exist
# in the image, owned by that user: a fresh named volume copies their ownership.
RUN groupadd --gid 10001 qwen \
    && useradd --uid 10001 --gid qwen --home-dir /home/qwen --create-home --shell /usr/sbin/nologin qwen \
    && mkdir -p /home/qwen/.cache/qwen-serve /run/qwen-serve \
    && chown -R qwen:qwen /home/qwen /run/qwen-serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Fetches the default model on first start unless QWEN_SERVE_MODEL names a file, then runs qwen-serve.
# `serve` reads its QWEN_SERVE_* variables itself; for `worker` they become flags here (a flag given on
# the command line wins).
COPY --chmod=755 <<'EOF' /usr/local/bin/qwen-serve-entrypoint
#!/bin/sh
set -e
if [ -z "${QWEN_SERVE_MODEL:-}" ] && [ "${1:-serve}" != "fetch-model" ]; then
  qwen-serve fetch-model >&2   # progress to the container log; a no-op once the file is verified
  QWEN_SERVE_MODEL="$(python3 -c 'from gpu_worker.model.fetch import default_model_path as p; print(p())')"
  export QWEN_SERVE_MODEL
fi
if [ "${1:-}" = "worker" ]; then
  # The healthcheck wants a socket newer than this start: one left by a crashed run does not count.
  touch "${TMPDIR:-/tmp}/qwen-serve-worker.started"
  for pair in MODEL:--model BACKEND:--backend KV_CACHE_GB:--kv-cache-gb NUM_KV_BLOCKS:--num-kv-blocks \
              BLOCK_SIZE:--block-size MAX_BATCH:--max-batch MAX_TOKENS_PER_STEP:--max-tokens-per-step \
              LOG_LEVEL:--log-level; do
    value="$(printenv "QWEN_SERVE_${pair%%:*}" || true)"
    case " $* " in *" ${pair#*:} "*) continue ;; esac
    if [ -n "$value" ]; then set -- "$@" "${pair#*:}" "$value"; fi
  done
fi
exec qwen-serve "$@"
EOF

WORKDIR /app
USER 10001:10001
RUN if [ "$BAKE_MODEL" = "1" ]; then qwen-serve fetch-model; fi
VOLUME ["/home/qwen/.cache/qwen-serve"]
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/qwen-serve-entrypoint"]
CMD ["serve"]

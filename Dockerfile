# syntax=docker/dockerfile:1
# maxbatch service, GPU-ready. torch comes from PyTorch's own CUDA wheel index: the wheels carry
# the CUDA runtime libraries (nvidia-* packages), so the base is plain slim Python and the host
# only needs the NVIDIA driver and the NVIDIA Container Toolkit.
#
#   docker build -t maxbatch .
#   docker run --gpus all -p 8000:8000 -v maxbatch-data:/data -e MAXBATCH_API_TOKEN=... maxbatch
#
# Without MAXBATCH_API_TOKEN the server refuses to listen on 0.0.0.0 and exits with an error.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# The CUDA build of torch: cu126, cu128, ... (see https://download.pytorch.org/whl/).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Optional extras of maxbatch, e.g. "ray" for the Ray dispatcher and the nodes of its cluster.
ARG EXTRAS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: forwards signals to the server and reaps the probe processes it orphans.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin maxbatch \
    && mkdir -p /data \
    && chown maxbatch:maxbatch /data

# The large layer first, so that code changes do not download torch again.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/maxbatch
COPY pyproject.toml README.md ./
COPY probes ./probes
COPY app ./app
RUN pip install ".${EXTRAS:+[$EXTRAS]}"

ENV MAXBATCH_DATA_DIR=/data \
    MAXBATCH_HOST=0.0.0.0 \
    MAXBATCH_PORT=8000 \
    HF_HOME=/data/huggingface

VOLUME ["/data"]
USER maxbatch
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MAXBATCH_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["tini", "--"]
CMD ["maxbatch", "serve", "--host", "0.0.0.0"]

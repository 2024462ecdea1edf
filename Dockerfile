# syntax=docker/dockerfile:1
#
# rerank-proxy: an aiohttp reverse proxy for Elasticsearch that reranks
# `_search` hits with a transformers cross-encoder.
#
#   docker build -t rerank-proxy .                                # add --build-arg WITH_COMPILER=1
#                                                                  # for rerank.compile: true
#   docker run --rm --init -p 8000:8000 -p 127.0.0.1:9901:9901 -v hf-models:/models \
#       -e RERANK_PROXY_UPSTREAM_URL=http://elasticsearch:9200 rerank-proxy
#
# Ports: 8000 for Elasticsearch clients; 9901 is the admin listener (/health/live,
# /health/ready, /metrics, /_rerank/stats). The image binds it on all of the
# container's interfaces so that Kubernetes probes and Prometheus, which reach
# the pod's address, get it; never publish it beyond the host or the pod
# network (above: the host's loopback only).
#
# `docker stop` sends SIGTERM: the proxy fails readiness, stops accepting and
# finishes the requests in flight for up to server.shutdown_timeout_s (30 s),
# so give `docker stop -t` (10 s by default) a little more than that.
#
# torch flavour
# -------------
# By default torch comes from PyPI. On linux/amd64 the PyPI wheel already
# bundles CUDA (it pulls in the nvidia-* runtime wheels), so the same image
# runs on CPU or, with `--gpus all` / docker-compose.gpu.yml, on an NVIDIA GPU;
# no CUDA base image is needed. The price is a multi-GB image. For a much
# smaller CPU-only image, build against the PyTorch CPU index:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t rerank-proxy:cpu .
#
# (A CPU-only image cannot use RERANK_PROXY_RERANK_DEVICE=cuda.)

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# Build stage: install the package and its dependencies into a virtualenv.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

# torch is by far the largest dependency: install it in its own layer, before
# the source is copied, so code changes do not re-download it.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --index-url "${TORCH_INDEX_URL}" torch; \
    else \
        pip install torch; \
    fi

WORKDIR /src
# The build context is filtered by .dockerignore (no tests, caches, venvs...).
COPY . .
# Smoke test: the console script is installed and its imports resolve.
RUN pip install . \
    && rerank-proxy --help > /dev/null

# ---------------------------------------------------------------------------
# Runtime stage: the virtualenv, the default config, and a non-root user.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="rerank-proxy" \
      org.opencontainers.image.description="Elasticsearch reverse proxy that reranks _search hits with a cross-encoder"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RERANK_PROXY_SERVER_HOST=0.0.0.0 \
    RERANK_PROXY_SERVER_ADMIN_HOST=0.0.0.0 \
    RERANK_PROXY_SERVER_ADMIN_PORT=9901

# rerank.compile: true needs a compiler at run time: inductor builds its CPU kernels with g++, Triton
# its GPU launchers with gcc. The slim image has neither, so there the proxy refuses the setting at
# start in one line. --build-arg WITH_COMPILER=1 adds g++ (which brings gcc; a few hundred MB) so that
# compile works: on the 2-core CPU of benchmarks/README.md it took MiniLM-L6 from 91 to 102 pairs/s.
ARG WITH_COMPILER=0
RUN if [ "${WITH_COMPILER}" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Fixed uid/gid so host bind mounts for /models can be chowned to 10001.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
    && mkdir -p /models /app \
    && chown app:app /models

COPY --from=builder /opt/venv /opt/venv
COPY config/ /app/config/

WORKDIR /app
USER app

# Hugging Face cache (model weights). Declared after the chown so that a new
# named volume starts out owned by the app user.
VOLUME ["/models"]

EXPOSE 8000 9901

# Readiness on the admin listener: 200 once the model is loaded and
# Elasticsearch answers, 503 while loading, draining or cut off from
# Elasticsearch. The image has no curl: urlopen raises on a 503 or a refused
# connection -> exit 1. The long start period leaves time for a first-run
# model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('RERANK_PROXY_SERVER_ADMIN_PORT', '9901'), timeout=4)"]

STOPSIGNAL SIGTERM

ENTRYPOINT ["rerank-proxy"]
CMD ["--config", "/app/config/default.yaml"]

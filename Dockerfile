# syntax=docker/dockerfile:1
#
# rerank-proxy: an aiohttp reverse proxy for Elasticsearch that reranks
# `_search` hits with a transformers cross-encoder.
#
#   docker build -t rerank-proxy .
#   docker run --rm --init -p 8000:8000 -v hf-models:/models \
#       -e RERANK_PROXY_UPSTREAM_URL=http://elasticsearch:9200 rerank-proxy
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
    RERANK_PROXY_SERVER_HOST=0.0.0.0

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

EXPOSE 8000

# `/` is passed through to Elasticsearch, so this checks the proxy *and* its
# upstream. Any HTTP error or connection failure makes urlopen raise -> exit 1.
# The long start period leaves time for a first-run model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('RERANK_PROXY_SERVER_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["rerank-proxy"]
CMD ["--config", "/app/config/default.yaml"]

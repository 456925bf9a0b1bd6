# The reranker service in a container. Configured entirely by RERANKER_*
# environment variables (docs/operating.md, Settings, lists them); the model comes from a
# mounted Hugging Face cache (HF_HOME) or a mounted checkpoint directory, never
# from the network at run time.
#
#   docker build -t qwen3-reranker .
#   docker run --gpus all -p 50051:50051 -p 8080:8080 -p 9400:9400 \
#     -v ~/.cache/huggingface:/cache/huggingface \
#     -e RERANKER_MODEL=Qwen/Qwen3-Reranker-0.6B qwen3-reranker
#
# CPU-only image (a much smaller torch):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t qwen3-reranker:cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in a layer of its own: the largest download, and the one that
# changes least. The PyPI wheel is a CUDA build; TORCH_INDEX_URL picks another.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=""
# (hadolint cannot see that the TORCH argument pins the version.)
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH"; \
    fi

WORKDIR /app
# Then the client package (the generated stubs and reranker_client; grpcio and
# protobuf only): the service depends on it by name, so it goes in first.
COPY clients/python ./clients/python
# (A local path: clients/python/pyproject.toml bounds the versions.)
# hadolint ignore=DL3013
RUN pip install ./clients/python

# Then the service, with bitsandbytes for int8 / nf4 weights (`quant`) and OpenTelemetry (`tracing`).
COPY pyproject.toml README.md* ./
COPY service ./service
COPY workers ./workers
# (A local path: pyproject.toml bounds the versions.)
# hadolint ignore=DL3013
RUN pip install ".[quant,tracing]"

# A user without privileges; the Hugging Face cache is mounted at HF_HOME.
RUN groupadd --gid 10001 reranker \
    && useradd --uid 10001 --gid 10001 --create-home reranker \
    && mkdir -p /cache/huggingface \
    && chown reranker:reranker /cache/huggingface
ENV HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    RERANKER_HOST=0.0.0.0 \
    RERANKER_PORT=50051 \
    RERANKER_HTTP_PORT=8080 \
    RERANKER_METRICS_PORT=9400 \
    RERANKER_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/reranker

# gRPC, HTTP/JSON, and Prometheus /metrics.
EXPOSE 50051 8080 9400

# The gRPC health protocol, through the image's own CLI (no grpc_health_probe
# binary). Loading a large model takes minutes: start-period covers it.
# With TLS on (RERANKER_TLS_CERT), override it to add `--tls --ca <file>`.
# Shell form, so that RERANKER_PORT is read when the check runs.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD reranker health --target "127.0.0.1:${RERANKER_PORT:-50051}" --timeout 4 || exit 1

ENTRYPOINT ["reranker"]
CMD ["serve"]

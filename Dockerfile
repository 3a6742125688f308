# syntax=docker/dockerfile:1
# meshgate image: build with Debian's packaged libraries, run as non-root on bookworm-slim.
#   docker build -t meshgate .
#   docker run --rm -p 8080:8080 -p 50051:50051 -e MESHGATE_JWT_SECRET=... meshgate
# The runtime package list lives in ONE place, RUNTIME_PACKAGES below; the build stage checks
# it against what the binaries actually link (tests/deploy/check-runtime-libs.sh), so the
# image build fails if a library is added to the code but not to the runtime stage.

FROM debian:bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      libgrpc-dev protobuf-c-compiler libprotobuf-c-dev \
      libhiredis-dev librdkafka-dev libnats-dev libwebsockets-dev libwebsockets-evlib-ev libev-dev \
      libcurl4-openssl-dev \
      libjansson-dev libjwt-dev libssl-dev libjemalloc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMG_BUILD_TESTS=OFF \
 && cmake --build build --parallel "$(nproc)" --target meshgate meshgate-cli \
 && strip build/meshgate build/meshgate-cli \
 && tests/deploy/check-runtime-libs.sh --dockerfile Dockerfile build/meshgate build/meshgate-cli

FROM debian:bookworm-slim AS runtime
# Shared libraries the binaries link (checked by tests/deploy/check-runtime-libs.sh).
ARG RUNTIME_PACKAGES="libgrpc29 libprotobuf-c1 libhiredis0.14 librdkafka1 libnats3.4 libwebsockets17 libev4 libcurl4 libjansson4 libjwt0 libssl3 libjemalloc2"
# Not linked: trust store for TLS to Consul/Kafka/Redis; lws's libev glue, a plugin it dlopens
# (libwebsockets-evlib_ev.so) when the WebSocket thread hands it its epoll loop.
ARG RUNTIME_EXTRA_PACKAGES="ca-certificates libwebsockets-evlib-ev"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${RUNTIME_PACKAGES} ${RUNTIME_EXTRA_PACKAGES} \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 meshgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshgate
COPY --from=build /src/build/meshgate /src/build/meshgate-cli /usr/local/bin/
# In a container loopback is unreachable from outside; Kubernetes sets the same via the chart.
ENV MESHGATE_WS_LISTEN=0.0.0.0:8080 \
    MESHGATE_GRPC_LISTEN=0.0.0.0:50051 \
    MESHGATE_LOG_FORMAT=json
EXPOSE 8080 50051
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["/usr/local/bin/meshgate-cli", "health", "--addr", "127.0.0.1:50051"]
# SIGTERM starts the drain (see DESIGN.md, Lifecycle); give `docker stop -t` the drain window.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/meshgate"]

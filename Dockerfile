# rlsgate container image.
#
#   docker build -t rlsgate .
#   docker run --rm -p 6432:6432 \
#       -v "$PWD/rlsgate.toml:/etc/rlsgate/rlsgate.toml:ro" \
#       -e RLSGATE_UPSTREAM_PASSWORD -e RLSGATE_JWT_SECRET \
#       rlsgate
#
# Inside a container, [server] listen must be "0.0.0.0:6432" for clients
# outside the container (as a Kubernetes sidecar, the pod shares one network
# namespace, so the default "127.0.0.1:6432" is what you want; see
# config/sidecar-pod.example.yaml).

# --- build stage -----------------------------------------------------------
FROM rust:1-bookworm AS builder

# pg_query builds libpg_query and generates its bindings with bindgen,
# which needs libclang.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev clang \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# The whole build context (see .dockerignore): Cargo.toml, Cargo.lock,
# src/, sql/ (the schema `rlsgate demo` loads), config/.
COPY . .
RUN cargo build --profile dist --locked --bin rlsgate \
 && strip target/dist/rlsgate

# --- runtime stage ---------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: the system CA bundle, for outgoing TLS (upstream
# connections, a remote JWKS URL) when no CA file is configured.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 rlsgate \
 && useradd --system --uid 10001 --gid rlsgate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin rlsgate \
 && mkdir -p /etc/rlsgate

COPY --from=builder /build/target/dist/rlsgate /usr/local/bin/rlsgate
COPY config/rlsgate.example.toml /etc/rlsgate/rlsgate.example.toml

USER 10001:10001
EXPOSE 6432 9930
ENTRYPOINT ["rlsgate"]
CMD ["serve", "--config", "/etc/rlsgate/rlsgate.toml"]

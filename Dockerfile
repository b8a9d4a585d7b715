# Multi-stage build: compile in the Rust image, run in a slim Debian image
# as a non-root user.
#   docker build -t redis-sidecar .
#   docker run -p 127.0.0.1:6380:6380 -p 127.0.0.1:9121:9121 \
#     -e REDIS_URL=redis://redis:6379 -e REDIS_SIDECAR_ADMIN_TOKEN=... redis-sidecar
# Publish the ports on loopback (or a private network) only: the client
# port hands out the upstream URL's credentials, and the admin API can
# reload and switch upstreams (REDIS_SIDECAR_ADMIN_TOKEN sets its token).
# With a config file (its listen/admin_listen are overridden by the CMD
# flags below unless you replace the CMD):
#   docker run -v $PWD/config:/etc/redis-sidecar:ro \
#     -e REDIS_SIDECAR_CONFIG=/etc/redis-sidecar/redis-sidecar.toml redis-sidecar
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/framing.rs \
    && cargo build --release --locked --bin redis-sidecar || true
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin redis-sidecar

FROM debian:bookworm-slim
# System roots for rediss:// endpoints (Redis Cloud, ElastiCache, Upstash).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
COPY --from=build /src/target/release/redis-sidecar /usr/local/bin/redis-sidecar
COPY config/redis-sidecar.example.toml /etc/redis-sidecar/redis-sidecar.example.toml
USER sidecar
EXPOSE 6380 9121
ENTRYPOINT ["/usr/local/bin/redis-sidecar"]
# In a container the listeners must not be loopback-only.
CMD ["--listen", "0.0.0.0:6380", "--admin-listen", "0.0.0.0:9121"]

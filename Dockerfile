# syntax=docker/dockerfile:1
# dagq: one image for every role (worker, migrate, demo, publish, mock-llm, ...).
#   docker build -t dagq .
#   docker run --rm dagq --help
# compose.yaml runs RabbitMQ, PostgreSQL, the migration, two workers and the demo.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and compiled dependencies between builds;
# the binary is copied out because the target directory is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dagq \
    && install -m 0755 target/release/dagq /usr/local/bin/dagq

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin dagq
COPY --from=builder /usr/local/bin/dagq /usr/local/bin/dagq
# Example workflows, so that `dagq workflow apply workflows/code-review.json` works in
# the container. No dagq.toml is baked in: mount one and point DAGQ_CONFIG at it.
COPY --chown=dagq:dagq workflows /app/workflows
WORKDIR /app
USER dagq
ENV DAGQ_LOG=info
# /metrics, /healthz and /readyz of `dagq worker`.
EXPOSE 9464
ENTRYPOINT ["dagq"]
CMD ["worker"]

# syntax=docker/dockerfile:1
# vigil, built from this workspace: `docker build -t vigil .` (compose.yaml builds it too).
#
# Stages:
#   skeleton  the workspace reduced to what decides the dependency build: every Cargo.toml,
#             Cargo.lock, and each Rust file emptied to `fn main() {}`. It is identical as long
#             as no manifest, the lockfile or the set of Rust files changes, so the next stage's
#             dependency layer stays cached across source edits.
#   build     compiles the dependencies against the skeleton (cached), then vigil itself
#             (`cargo build --locked --release`: the root package, the `vigil` binary).
#   runtime   debian:bookworm-slim (the builder's glibc), ca-certificates, the binary, a
#             non-root user; the state lives under /var/lib/vigil (keys, certs volumes).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS skeleton
WORKDIR /src
COPY . .
RUN printf 'fn main() {}\n' > /tmp/stub.rs \
 && find . -name '*.rs' -exec cp /tmp/stub.rs {} \; \
 && find . -type f ! -name '*.rs' ! -name Cargo.toml ! -name Cargo.lock -delete

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never
# the dependency layer: rebuilt only when the skeleton changes
COPY --from=skeleton /src ./
RUN cargo build --locked --release
# the real sources; touched so cargo rebuilds the workspace's own crates over the skeleton's
COPY . .
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
 && cargo build --locked --release \
 && install -D -m 0755 target/release/vigil /out/vigil

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vigil \
 && useradd --system --uid 10001 --gid vigil --home-dir /var/lib/vigil --shell /usr/sbin/nologin vigil \
 && install -d -o vigil -g vigil -m 0750 /var/lib/vigil /var/lib/vigil/data /var/lib/vigil/keys /var/lib/vigil/certs
COPY --from=build /out/vigil /usr/local/bin/vigil
USER 10001:10001
WORKDIR /var/lib/vigil
# 8443 HTTPS and 8080 HTTP (the edge), 9901 proxy admin, 3000 auth API, 9902 auth admin, 9903 exporter
EXPOSE 8443 8080 9901 3000 9902 9903
ENTRYPOINT ["/usr/local/bin/vigil"]
CMD ["up", "--data-dir", "/var/lib/vigil/data"]

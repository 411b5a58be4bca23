# PeerVault: one image with the server (`peervault`) and the CLI (`pvault`).
#
#   docker build -t peervault .                     # compiles in a Rust image, runs on distroless
#
# Base images are build arguments, so a machine without a registry can build from bases it made
# itself. The `prebuilt` target packages binaries that cargo already built on the host instead of
# compiling again (what the container tests use; see docs/kubernetes.md):
#
#   docker build --target prebuilt --build-arg RUNTIME_IMAGE=<local base> \
#     --build-arg BIN_DIR=target/debug -t peervault:test .
#
# The runtime base needs glibc, libgcc_s and a user 65532; distroless/cc is exactly that.
# Stage order matters for the classic builder, which builds every stage before the target:
# `prebuilt` comes before `build` so it never needs the Rust image.

ARG RUST_IMAGE=docker.io/library/rust:1.90-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUNTIME_IMAGE} AS base
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="peervault" \
      org.opencontainers.image.description="PeerVault: Kubernetes-native distributed file and blob store (server peervault, CLI pvault)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/peervault" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# Data lives on the volume at /data; nothing else is written except under /tmp, so the root
# filesystem can be mounted read-only (mount a tmpfs or emptyDir at /tmp).
ENV PEERVAULT_DATA_DIR=/data \
    PEERVAULT_LOG_FORMAT=json \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8082 8083 9090
ENTRYPOINT ["/usr/local/bin/peervault"]
CMD ["serve", "all"]

# Binaries built on the host (`cargo build -p peervault -p peervault-cli --bin peervault --bin pvault`), e.g. in CI.
FROM base AS prebuilt
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/peervault ${BIN_DIR}/pvault /usr/local/bin/

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p peervault -p peervault-cli --bin peervault --bin pvault \
 && mkdir -p /out \
 && cp target/release/peervault target/release/pvault /out/ \
 && strip /out/peervault /out/pvault

# The default target: compiled in the Rust stage.
FROM base AS image
COPY --from=build /out/peervault /out/pvault /usr/local/bin/

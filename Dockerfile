# syntax=docker/dockerfile:1
#
# Images of clip, one per program, built from the repository root with BuildKit:
#
#   docker build --target node       -t ghcr.io/clip-dev/clip-node:0.1.0 .
#   docker build --target controller -t ghcr.io/clip-dev/clip-controller:0.1.0 .
#   docker build --target cli        -t ghcr.io/clip-dev/clip:0.1.0 .
#
# node        `clip node`, the CSI node plugin (runs as root: see its stage), and
#             `clip keeper`, which holds its mounts across its restarts (chart: node.keeper)
# controller  `clip-controller`, the ClipImage controller (unprivileged)
# cli         `clip index|inspect|cat|mount`, for people and CI jobs (unprivileged)
#
# The Helm chart (charts/clip) runs ghcr.io/clip-dev/clip-node and
# ghcr.io/clip-dev/clip-controller, tagged with its appVersion, which is the workspace
# version in Cargo.toml: tag the images with that version. All three targets share the
# builder stage, so building them one after another compiles once.
#
# Without a container engine, scripts/check-image-runtime.sh replays the runtime stages in a
# debootstrap chroot and runs each image's programs as its USER (CI does).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The toolchain rust-toolchain.toml pins, with its components, in a layer of its own.
COPY rust-toolchain.toml ./
RUN rustup toolchain install
COPY . .
# protox compiles the CSI proto in build.rs: no protoc needed. The target directory lives in
# a cache mount, so the binaries are copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p clip-driver --bin clip \
        -p clip-controller --bin clip-controller \
 && install -D -m 0755 target/release/clip /out/clip \
 && install -D -m 0755 target/release/clip-controller /out/clip-controller

# What every program needs: CA certificates for registries and Redis TLS, and the
# unprivileged user 65532 (the chart's controller runs as this uid).
FROM debian:${DEBIAN_RELEASE}-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 clip \
 && useradd --system --uid 65532 --gid clip --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin clip
LABEL org.opencontainers.image.source="https://example.invalid/clip" \
      org.opencontainers.image.licenses="Apache-2.0"

# FUSE: fusermount3 (setuid) lets an unprivileged `clip mount` mount and unmount, and
# user_allow_other lets it mount with allow_other as clip does. Root needs neither.
FROM base AS fuse
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i 's/^#[[:space:]]*user_allow_other/user_allow_other/' /etc/fuse.conf

FROM fuse AS node
COPY --from=builder /out/clip /usr/local/bin/clip
# Root, and the DaemonSet runs it privileged: the node plugin mounts FUSE filesystems on
# target paths inside the kubelet's directory, and those mounts must propagate back to the
# host (mountPropagation: Bidirectional), which only a privileged container can do. It also
# detaches stale mounts (umount2) and writes its state and cache to host directories.
USER 0:0
ENTRYPOINT ["clip"]
CMD ["node"]

FROM base AS controller
COPY --from=builder /out/clip-controller /usr/local/bin/clip-controller
USER 65532:65532
ENTRYPOINT ["clip-controller"]

# Last, so that a build without --target gives the CLI.
FROM fuse AS cli
COPY --from=builder /out/clip /usr/local/bin/clip
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["clip"]
CMD ["--help"]

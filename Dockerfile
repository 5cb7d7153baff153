# syntax=docker/dockerfile:1
# auditor image: build with the eBPF toolchain, ship only the binary.
#
#   docker build -t valkey-auditor .
#
# The image cannot do anything without the host's kernel interfaces and privileges: run it as
# deploy/kubernetes/daemonset.yaml does (hostPID, CAP_BPF CAP_PERFMON CAP_SYS_PTRACE
# CAP_DAC_READ_SEARCH, /sys/kernel/tracing, /sys/fs/bpf and /sys/kernel/btf from the host).

# Userspace toolchain (rust:<version>-bookworm is Debian 12 like the hosts) and the eBPF toolchain, both
# pinned to the releases in /work/shared/reference/ebpf-toolchain.md: stable 1.95.0 (LLVM 22.1.2) and
# nightly 1.97.0 of 2026-05-19 (LLVM 22.1.4), whose libLLVM bpf-linker 0.13.0 (LLVM 21-23) is linked to.
ARG RUST_VERSION=1.95.0
ARG EBPF_TOOLCHAIN=nightly-2026-05-20

FROM rust:${RUST_VERSION}-bookworm AS builder
ARG EBPF_TOOLCHAIN
# Read by scripts/setup.sh and by auditor/build.rs (aya-build runs `rustup run $EBPF_TOOLCHAIN cargo build
# -p auditor-ebpf --target bpfel-unknown-none -Z build-std=core`, linked by bpf-linker).
ENV EBPF_TOOLCHAIN=${EBPF_TOOLCHAIN} \
    CARGO_TERM_COLOR=never
WORKDIR /src

# The eBPF toolchain: nightly with rust-src (for -Z build-std=core). rust:bookworm already has gcc/cc
# for linking; bpf-linker needs no llvm-config (it links rustup's own libLLVM).
RUN rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal --component rust-src

# bpf-linker 0.13.0 built against that toolchain's libLLVM, exactly as on the hosts: the same script
# (steps 3-4 only: no tracefs/bpffs mounts, apt packages or test venv inside a build). Its own layer, so
# source changes do not rebuild it.
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh --toolchain-only \
    && bpf-linker --version

# The workspace. build.rs compiles auditor-ebpf and embeds the object, so this is one binary.
COPY . .
RUN cargo build --release --locked -p auditor \
    && install -D -m 0755 target/release/auditor /out/auditor

FROM debian:bookworm-slim AS runtime
# The binary needs only glibc and libgcc_s (both in bookworm-slim). No TLS is used (file, syslog and
# plain-TCP sinks), so no ca-certificates.
COPY --from=builder /out/auditor /usr/local/bin/auditor
# Default log directory of audit.protocol (`file /var/log/valkey/audit.log`); mount the host's over it.
RUN mkdir -p /var/log/valkey /etc/auditor
ENTRYPOINT ["/usr/local/bin/auditor"]
CMD ["--help"]

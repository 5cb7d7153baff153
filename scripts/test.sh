#!/usr/bin/env bash
# Set up and run every test: formatting, lints, unit tests, release build, integration tests against a
# real valkey-server. Run as root (BPF).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== cargo fmt --check"; cargo fmt --all --check
echo "== cargo clippy"; cargo clippy --release --all-targets -- -D warnings
echo "== cargo build --release"; cargo build --release
echo "== cargo test"; cargo test --release
echo "== integration tests"
"$ROOT/.venv/bin/python" -m pytest -v -p no:cacheprovider tests "$@"
echo "== capture tests again with --capture syscalls (AUDITOR_CAPTURE)"
AUDITOR_CAPTURE=syscalls "$ROOT/.venv/bin/python" -m pytest -v -p no:cacheprovider tests/test_capture.py "$@"

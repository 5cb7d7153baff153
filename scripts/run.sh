#!/usr/bin/env bash
# Set up, build and run the auditor.
#   sudo scripts/run.sh --pid <valkey pid> [more auditor args]   audit a running valkey-server
#   sudo scripts/run.sh --all [more auditor args]                audit every valkey-server, now and later
#   sudo scripts/run.sh --comm <name> [more auditor args]        audit every process of that name
#   sudo scripts/run.sh                                          start a demo valkey-server and audit it
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
(cd "$ROOT" && cargo build --release --quiet)
AUDITOR="$ROOT/target/release/auditor"

if [[ " $* " == *" --pid "* || " $* " == *" --all "* || " $* " == *" --comm "* ]]; then
  exec "$AUDITOR" "$@"
fi

DEMO="${AUDITOR_DEMO_DIR:-/tmp/auditor-demo}"
PORT="${VALKEY_PORT:-6379}"
mkdir -p "$DEMO"
"$ROOT/.venv/bin/valkey-server" --port "$PORT" --bind 127.0.0.1 --unixsocket "$DEMO/valkey.sock" \
  --save "" --appendonly no --dir "$DEMO" --daemonize no > "$DEMO/valkey.log" 2>&1 &
VALKEY_PID=$!
trap 'kill $VALKEY_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" PING >/dev/null || { echo "valkey-server did not start, see $DEMO/valkey.log" >&2; exit 1; }
# The control port the banner names: the one given with --control, if any.
CONTROL="127.0.0.1:6380"
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --control) CONTROL="${ARGS[i + 1]:-$CONTROL}" ;;
    --control=*) CONTROL="${ARGS[i]#--control=}" ;;
  esac
done
cat <<MSG
valkey-server pid $VALKEY_PID on 127.0.0.1:$PORT (unix socket $DEMO/valkey.sock)
audit log:        $DEMO/audit.log     (tail -f it; unless your settings name another)
talk to it:       redis-cli -p $PORT SET hello world
auditor control:  redis-cli -h ${CONTROL%:*} -p ${CONTROL##*:} PING
Ctrl-C stops both.
MSG
# The demo's settings first: the caller's come after them and win.
"$AUDITOR" --pid "$VALKEY_PID" audit.protocol "file $DEMO/audit.log" audit.format text "$@"

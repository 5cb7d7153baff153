#!/usr/bin/env bash
# A/B runs of auditor variants on one valkey-server, interleaved, for experiments that `cargo xtask
# bench` (the reference figures) is too coarse or too slow for. Prints, per run: ops/s, p50 and p99
# of SET and GET, valkey-server's CPU ticks during the run, the auditor's CPU ticks, AUDIT_LOSS
# records, log lines and the auditor's peak RSS.
#
#   scripts/ab-bench.sh P D N ROUNDS variant...
#
# A variant is `none` (no auditor) or extra auditor arguments joined by '+', e.g.
# `--wakeup-bytes+65536` or `--bench-capture-only+--capture-cap+64`, optionally after another
# build's binary: `@/path/to/auditor` or `@/path/to/auditor+--capture-cap+64`. Needs root, a release build
# (`cargo build --release`) and scripts/setup.sh's valkey-server. Ports: AB_PORT (default 7390) for
# the server, AB_PORT+1 for the control port. The server is left running for the next call; stop it
# with `redis-cli -p 7390 shutdown`.
#
# AB_PROG_STATS=1 also prints the run time of the auditor's `sys_exit` program during the run
# (kernel.bpf_stats_enabled, read with bpftool: `apt-get install bpftool`): the kernel side's own
# cost, free of the throughput noise of a shared host. Stats add a clock read per program run.
set -u
P=$1 D=$2 N=$3 R=$4
shift 4
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VPORT=${AB_PORT:-7390}
CPORT=$((VPORT + 1))
DIR=$ROOT/target/tmp/ab-bench-$VPORT
mkdir -p "$DIR"
if ! redis-cli -p "$VPORT" ping >/dev/null 2>&1; then
  "$ROOT/.venv/bin/valkey-server" --port "$VPORT" --save '' --appendonly no --dir "$DIR" \
    --daemonize yes --pidfile "$DIR/valkey.pid" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$VPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
VPID=$(cat "$DIR/valkey.pid")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# "run_time_ns run_cnt" of the newest sys_exit program (the auditor just started).
prog_stats() {
  bpftool prog show name sys_exit -j | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = max(d if isinstance(d, list) else [d], key=lambda p: p["id"])
print(d.get("run_time_ns", 0), d.get("run_cnt", 0))'
}
for r in $(seq "$R"); do
  for v in "$@"; do
    APID=""
    if [ "$v" != none ]; then
      rm -f "${AB_LOG:-$DIR/audit.log}"
      bin=$ROOT/target/release/auditor
      args=$v
      if [[ $v == @* ]]; then
        bin=${v%%+*}
        bin=${bin#@}
        args=${v#"@$bin"}
      fi
      # shellcheck disable=SC2086 # the variant's words are meant to split
      "$bin" --pid "$VPID" --control "127.0.0.1:$CPORT" ${args//+/ } \
        audit.protocol "file ${AB_LOG:-$DIR/audit.log}" audit.format json audit.events all \
        audit.command_result_mode all >/dev/null 2>"$DIR/auditor.err" &
      APID=$!
      for _ in $(seq 300); do
        redis-cli -p "$CPORT" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
      done
    fi
    prog=-
    if [ "${AB_PROG_STATS:-0}" = 1 ] && [ -n "$APID" ]; then
      sysctl -q kernel.bpf_stats_enabled=1
      p0=$(prog_stats)
    fi
    t0=$(ticks "$VPID")
    out=$(redis-benchmark -p "$VPORT" -t set,get -P "$P" -d "$D" -n "$N" -c 50 -r 100000 --csv \
      2>/dev/null | grep -E '^"(SET|GET)' |
      awk -F, '{gsub(/"/, ""); printf "%s %d p50=%s p99=%s  ", $1, $2, $5, $7}')
    t1=$(ticks "$VPID")
    if [ "${AB_PROG_STATS:-0}" = 1 ] && [ -n "$APID" ]; then
      p1=$(prog_stats)
      sysctl -q kernel.bpf_stats_enabled=0
      prog="$(((${p1% *} - ${p0% *}) / 1000000))ms/$((${p1#* } - ${p0#* }))runs"
    fi
    at=- loss=- lines=- hwm=-
    if [ -n "$APID" ]; then
      at=$(ticks "$APID")
      hwm=$(awk '/^VmHWM/ {print int($2 / 1024) "MB"}' "/proc/$APID/status")
      kill "$APID"
      wait "$APID"
      loss=$(grep -c AUDIT_LOSS "${AB_LOG:-$DIR/audit.log}")
      lines=$(wc -l <"${AB_LOG:-$DIR/audit.log}")
    fi
    echo "r$r $v | $out| valkey_ticks=$((t1 - t0)) auditor_ticks=$at sys_exit=$prog loss=$loss lines=$lines peak_rss=$hwm"
  done
done

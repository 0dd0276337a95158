#!/usr/bin/env bash
# Shared helpers for the scenario scripts: build the release binaries, start
# the sink backend and smtp-edge on free loopback ports, run smtp-load with
# --json and pull fields out of its report, clean up on exit. Sourced only.
set -euo pipefail

LT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$LT_DIR/.." && pwd)
# EDGE_BIN=/path/to/smtp-edge: test that binary (say, one built from another
# commit) instead of building and running target/release/smtp-edge;
# LOAD_BIN likewise for smtp-load (device.sh: the packed binaries).
LOAD=${LOAD_BIN:-$ROOT/target/release/smtp-load}
EDGE=${EDGE_BIN:-$ROOT/target/release/smtp-edge}
WORK=$(mktemp -d /tmp/smtp-edge-load.XXXXXX)
PIDS=()

# PIN=1: the proxy under test (smtp-edge, or a peer) runs on CPU 1 with one
# worker thread, the load generator and the sink on CPU 0 - as in
# production, where the proxy has a machine of its own. The load side then
# has the same one core in the direct and the proxied run, and the ratio
# says whether the proxy keeps up, not how it shares cores with the load.
if [ -n "${PIN:-}" ]; then
  LOAD_ON=(taskset -c 0)
  EDGE_ON=(taskset -c 1)
  EDGE_THREADS=${EDGE_THREADS:-1}
else
  LOAD_ON=()
  EDGE_ON=()
fi

# Peers (loadtest/peers/NAME.sh) started with start_peer, as "NAME DIR";
# stopped on exit.
PEERS_STARTED=()

cleanup() {
  local e
  for e in "${PEERS_STARTED[@]:-}"; do
    if [ -n "$e" ]; then "$LT_DIR/peers/${e%% *}.sh" stop "${e#* }" >/dev/null 2>&1 || true; fi
  done
  for p in "${PIDS[@]:-}"; do
    if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
  done
  for p in "${PIDS[@]:-}"; do
    if [ -n "$p" ]; then wait "$p" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# NO_BUILD=1: use the binaries already in target/release (built elsewhere,
# or for another commit) as they are.
build() {
  if [ -n "${NO_BUILD:-}" ]; then
    return 0
  fi
  if [ -n "${EDGE_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p smtp-load)
  else
    (cd "$ROOT" && cargo build --release -q -p smtp-edge -p smtp-load)
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  return 1
}

# start_sink PORT [SINK_ARGS...]: the smtp-load sink backend, with its output
# (e.g. the --json report it prints when stopped) in $WORK/sink.PORT.log;
# sets SINK_PID.
start_sink() {
  local port=$1
  shift
  "${LOAD_ON[@]}" "$LOAD" sink -l "127.0.0.1:$port" -q "$@" >"$WORK/sink.$port.log" 2>&1 &
  SINK_PID=$!
  PIDS+=("$SINK_PID")
  wait_port "$port"
}

# start_edge PORT BACKEND_PORT [LISTENER_TLS] [EXTRA_TOML] [BACKEND_MAX=1000]
# [BACKEND_EXTRA]: smtp-edge in front of the backend, with the backend's
# max_connections BACKEND_MAX and BACKEND_EXTRA more keys of its
# [[backend]] (tls = "starttls", say); sets EDGE_PID. EXTRA_TOML goes right after `hostname`, before
# [[listener]]: top-level keys and whole tables ([policy], [timeouts],
# [admin], [telemetry], ...). smtp-edge runs with RUST_LOG=warn, or
# RUST_LOG=$EDGE_LOG when EDGE_LOG is set (the telemetry scenario needs
# info: spans below the log level are not created, so not exported either).
start_edge() {
  local port=$1 backend=$2 tls=${3:-none} extra=${4:-} backend_max=${5:-1000} backend_extra=${6:-}
  cat >"$WORK/edge.$port.toml" <<TOML
hostname = "edge.loadtest"
$extra
[[listener]]
address = "127.0.0.1:$port"
tls = "$tls"
[[backend]]
address = "127.0.0.1:$backend"
max_connections = $backend_max
$backend_extra
TOML
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  TOKIO_WORKER_THREADS=${EDGE_THREADS:-$(nproc)} RUST_LOG=${EDGE_LOG:-warn} "${EDGE_ON[@]}" "$EDGE" --config "$WORK/edge.$port.toml" >"$WORK/edge.$port.log" 2>&1 &
  EDGE_PID=$!
  PIDS+=("$EDGE_PID")
  wait_port "$port"
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# forget PID: drop a stopped process from the cleanup list.
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# start_peer NAME CMD PORT BACKEND_PORT [ARGS...]: loadtest/peers/NAME.sh
# CMD (start, start-tls, ...) on 127.0.0.1:PORT in front of
# 127.0.0.1:BACKEND_PORT, state in $WORK/NAME.PORT (PEER_DIR), ARGS after
# the backend (nginx: [CERT KEY] AUTH_PORT). With PIN=1 it runs where
# smtp-edge would (its processes inherit the CPU), nginx with one worker
# and Haraka with one node (PEERS.md). Stopped on exit, or with stop_peer.
# Returns 1 (the reason in $WORK/NAME.PORT.log) when it does not start:
# not installed (loadtest/peers/install.sh), say.
start_peer() {
  local name=$1 cmd=$2 port=$3 backend=$4
  shift 4
  PEER_DIR="$WORK/$name.$port"
  local env=()
  if [ -n "${PIN:-}" ]; then
    env=(NGINX_WORKERS=1 HARAKA_NODES=1)
  fi
  if env "${env[@]}" "${EDGE_ON[@]}" "$LT_DIR/peers/$name.sh" "$cmd" "$PEER_DIR" "$port" "127.0.0.1:$backend" "$@" >"$PEER_DIR.log" 2>&1; then
    PEERS_STARTED+=("$name $PEER_DIR")
  else
    return 1
  fi
}

# stop_peer NAME DIR: stop a peer that start_peer started.
stop_peer() {
  local keep=() e
  "$LT_DIR/peers/$1.sh" stop "$2" >/dev/null 2>&1 || true
  for e in "${PEERS_STARTED[@]}"; do [ "$e" = "$1 $2" ] || keep+=("$e"); done
  PEERS_STARTED=("${keep[@]}")
}

# peer_pids NAME DIR: the peer's process (from its pid file) and its
# children (nginx's workers, Haraka's nodes), one per line: what
# --watch-pid should sum.
peer_pids() {
  local pid
  pid=$(cat "$2/$1.pid")
  echo "$pid"
  ps -o pid= --ppid "$pid" | tr -d ' ' || true # no children: ps exits 1
}

# load OUT ARGS...: smtp-load run --json -q ARGS, report saved to OUT.
load() {
  local out=$1
  shift
  if ! "${LOAD_ON[@]}" "$LOAD" run --json -q "$@" >"$out" 2>"$out.err"; then
    # A report with refused or dropped messages is still a measurement.
    if [ -n "${ALLOW_INCOMPLETE:-}" ] && [ -s "$out" ]; then
      return 0
    fi
    echo "smtp-load run $* failed:" >&2
    cat "$out.err" >&2
    return 1
  fi
}

# field FILE KEY.PATH: one value from a JSON report.
field() {
  python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k] if v is not None else None
print(v if not isinstance(v, float) else round(v, 3))' "$1" "$2"
}

# codes FILE: a report's non-2xx replies by stage and its errors, or "none".
codes() {
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
out = [f"{st} {c}: {n}" for st, cs in r["replies"].items() for c, n in sorted(cs.items())
       if not (c.startswith("2") or c == "354")]
out += [f"error {k}: {n}" for k, n in r["errors"].items() if n]
print(", ".join(out) or "none")' "$1"
}

# median of the numbers on the command line
median() {
  python3 -c 'import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:]), 3))' "$@"
}

ratio() {
  python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(round(a/b,3) if b else "nan")' "$1" "$2"
}

# setup [LISTENER_TLS] [EXTRA_TOML]: build, start the sink and smtp-edge in
# front of it (sets SINK, PROXY, SINK_PID, EDGE_PID) and print the machine
# line. EXTRA_TOML goes into smtp-edge's config (see start_edge).
setup() {
  build
  SINK=$(free_port)
  start_sink "$SINK"
  PROXY=$(free_port)
  start_edge "$PROXY" "$SINK" "${1:-none}" "${2:-}"
  machine
}

machine() {
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%dT%H:%MZ)"
}

# interleaved_runs REPS CONFIG...: the caller's `one_run CONFIG M OUT` for
# each mode (new connection per message: M=1; persistent: M=0), repeat and
# config, the configs' order rotated per repeat so that none always runs
# first; OUT is $WORK/MODE.CONFIG.REPEAT.json.
interleaved_runs() {
  local reps=$1 mode m rep i n cfg
  shift
  local cfgs=("$@")
  n=${#cfgs[@]}
  for mode in new persistent; do
    m=1
    [ "$mode" = persistent ] && m=0
    for rep in $(seq 1 "$reps"); do
      for i in $(seq 0 $((n - 1))); do
        cfg=${cfgs[$(((i + rep - 1) % n))]}
        one_run "$cfg" "$m" "$WORK/$mode.$cfg.$rep.json"
      done
    done
  done
}

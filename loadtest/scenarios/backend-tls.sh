#!/usr/bin/env bash
# TLS to the backend against plaintext: the same closed-loop load through
# two smtp-edge instances in front of one `smtp-load sink --tls` (it offers
# STARTTLS), one relaying in plaintext (tls = "none"), one over STARTTLS
# (tls = "starttls", tls_verify = false: the sink's certificate is
# self-signed), alternated in one run; 4 KiB messages, new connection per
# message and persistent. Reports msgs/s and smtp-edge's CPU per 1 000
# messages for each, and the TLS/plaintext ratios. The backend connections
# are pooled, so TLS costs a handshake per new backend connection (resumed
# after the first), not per client connection: issue 24 targets <= 10 % on
# the new-connection load. PIN=1 gives each smtp-edge the proxy's CPU.
# Usage: backend-tls.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
build
SINK=$(free_port)
start_sink "$SINK" --tls
PLAIN=$(free_port)
start_edge "$PLAIN" "$SINK" none "" 1000 'tls = "none"'
PLAIN_PID=$EDGE_PID
TLS=$(free_port)
ADMIN=$(free_port)
start_edge "$TLS" "$SINK" none $'[admin]\naddress = "127.0.0.1:'"$ADMIN"'"' 1000 $'tls = "starttls"\ntls_verify = false\ntls_server_name = "localhost"'
TLS_PID=$EDGE_PID
machine

# one_run CONFIG M OUT
one_run() {
  local port=$PLAIN pid=$PLAIN_PID
  if [ "$1" = tls ]; then port=$TLS; pid=$TLS_PID; fi
  load "$3" -t "127.0.0.1:$port" -c "$CONNS" -m "$2" -s 4096 -d "$SECS" --warmup 1 --watch-pid "$pid"
}
interleaved_runs "$REPS" plain tls

printf '%-11s %12s %12s %7s %16s %16s %7s\n' mode plain/s tls/s ratio "plain cpu/1k" "tls cpu/1k" ratio
for mode in new persistent; do
  p=(); t=(); pc=(); tc=()
  for rep in $(seq 1 "$REPS"); do
    p+=("$(field "$WORK/$mode.plain.$rep.json" msgs_per_sec)")
    t+=("$(field "$WORK/$mode.tls.$rep.json" msgs_per_sec)")
    pc+=("$(field "$WORK/$mode.plain.$rep.json" server.cpu_s_per_1000)")
    tc+=("$(field "$WORK/$mode.tls.$rep.json" server.cpu_s_per_1000)")
  done
  pm=$(median "${p[@]}"); tm=$(median "${t[@]}")
  pcm=$(median "${pc[@]}"); tcm=$(median "${tc[@]}")
  printf '%-11s %12s %12s %7s %15ss %15ss %7s\n' "$mode" "$pm" "$tm" "$(ratio "$tm" "$pm")" "$pcm" "$tcm" "$(ratio "$tcm" "$pcm")"
done
# The TLS instance's backend connections were TLS (and mostly resumed).
curl -s "127.0.0.1:$ADMIN/metrics" | grep -E '^smtp_edge_backend_(tls_|connections_created)' || true

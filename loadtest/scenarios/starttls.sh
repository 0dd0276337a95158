#!/usr/bin/env bash
# Scenario 4, STARTTLS: TLS handshakes/s through smtp-edge (connect, EHLO,
# STARTTLS, EHLO, QUIT) against the same churn without TLS, and message
# throughput with STARTTLS on versus off (new connection per message).
# Usage: starttls.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
setup starttls
printf '%-28s %12s %12s %7s %16s\n' load "plain/s" "starttls/s" ratio "tls handshake p50"
for what in churn messages; do
  args=(--churn); [ "$what" = messages ] && args=(-m 1 -s 4096)
  p=(); t=(); h=()
  for _ in $(seq 1 "$REPS"); do
    load "$WORK/p.json" -t "127.0.0.1:$PROXY" -c "$CONNS" -d "$SECS" --warmup 1 "${args[@]}"
    load "$WORK/t.json" -t "127.0.0.1:$PROXY" -c "$CONNS" -d "$SECS" --warmup 1 --starttls "${args[@]}"
    p+=("$(field "$WORK/p.json" msgs_per_sec)")
    t+=("$(field "$WORK/t.json" msgs_per_sec)")
    h+=("$(field "$WORK/t.json" latency_us.tls_handshake.p50)")
  done
  pm=$(median "${p[@]}"); tm=$(median "${t[@]}")
  label="connections (EHLO, QUIT)"; [ "$what" = messages ] && label="messages (4 KiB, new conn)"
  printf '%-28s %12s %12s %7s %14sus\n' "$label" "$pm" "$tm" "$(ratio "$tm" "$pm")" "$(median "${h[@]}")"
done

#!/usr/bin/env bash
# Scenario 6, peer comparison: the same load (4 KiB messages, no client
# pipelining since nginx's mail proxy offers none) straight to the sink, and
# through HAProxy (mode tcp), nginx mail proxy (tuned, PEERS.md), Haraka
# (smtp_forward) and smtp-edge, each in front of the same sink; msgs/s and the
# ratio to direct, new connection per message and persistent. Peers that are
# not installed (loadtest/peers/install.sh) are skipped.
# Paths are interleaved within each repeat; the table shows medians.
# Usage: peers.sh [SECONDS_PER_RUN=5] [CONNECTIONS=50] [REPEATS=3]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
CONNS=${2:-50}
REPS=${3:-3}
PEERS="$LT_DIR/peers"
build
SINK=$(free_port); start_sink "$SINK"
PROXY=$(free_port); start_edge "$PROXY" "$SINK"
declare -A PORT
PORT[direct]=$SINK
PORT[smtp-edge]=$PROXY
started=()
for peer in haproxy nginx haraka; do
  p=$(free_port)
  args=("$WORK/$peer" "$p" "127.0.0.1:$SINK")
  [ "$peer" = nginx ] && args+=("$(free_port)") # its auth_http port
  # With PIN=1 the peer gets smtp-edge's CPU (its worker processes inherit it).
  if "${EDGE_ON[@]}" "$PEERS/$peer.sh" start "${args[@]}" >"$WORK/$peer.start.log" 2>&1; then
    PORT[$peer]=$p
    started+=("$peer")
  else
    echo "skipping $peer (see loadtest/peers/install.sh): $(tail -1 "$WORK/$peer.start.log")" >&2
  fi
done
stop_peers() { for peer in "${started[@]:-}"; do [ -n "$peer" ] && "$PEERS/$peer.sh" stop "$WORK/$peer" >/dev/null 2>&1 || true; done; cleanup; }
trap stop_peers EXIT INT TERM
machine
printf '%-10s %-11s %10s %7s\n' path mode msgs/s "vs direct"
declare -A RATES
for mode in new persistent; do
  m=1; [ "$mode" = persistent ] && m=0
  for _ in $(seq 1 "$REPS"); do
    for path in direct haproxy nginx haraka smtp-edge; do
      [ -n "${PORT[$path]:-}" ] || continue
      if [ "$path" = haraka ]; then # Haraka is slow: a count, not a duration
        run=(-n 2000)
      else
        run=(-d "$SECS" --warmup 1)
      fi
      if load "$WORK/r.json" -t "127.0.0.1:${PORT[$path]}" -c "$CONNS" -m "$m" -s 4096 --no-pipelining "${run[@]}"; then
        RATES[$path.$mode]="${RATES[$path.$mode]:-} $(field "$WORK/r.json" msgs_per_sec)"
      else
        echo "$path $mode: failed" >&2
      fi
    done
  done
  direct=$(median ${RATES[direct.$mode]})
  for path in direct haproxy nginx haraka smtp-edge; do
    [ -n "${RATES[$path.$mode]:-}" ] || continue
    # shellcheck disable=SC2086 # a list of numbers
    rate=$(median ${RATES[$path.$mode]})
    printf '%-10s %-11s %10s %7s\n' "$path" "$mode" "$rate" "$(ratio "$rate" "$direct")"
  done
done

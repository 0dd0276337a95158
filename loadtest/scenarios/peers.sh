#!/usr/bin/env bash
# Scenario 6, peer comparison: the same load (4 KiB messages, no client
# pipelining since nginx's mail proxy offers none) straight to the sink, and
# through HAProxy (mode tcp), nginx mail proxy (tuned, PEERS.md), Haraka
# (smtp_forward) and smtp-edge, each in front of the same sink; msgs/s and the
# ratio to direct, new connection per message and persistent. Peers that are
# not installed (loadtest/peers/install.sh) are skipped.
# Usage: peers.sh [SECONDS_PER_RUN=5] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
CONNS=${2:-50}
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
  if "$PEERS/$peer.sh" start "${args[@]}" >"$WORK/$peer.start.log" 2>&1; then
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
for mode in new persistent; do
  m=1; [ "$mode" = persistent ] && m=0
  direct=""
  for path in direct haproxy nginx haraka smtp-edge; do
    [ -n "${PORT[$path]:-}" ] || continue
    n=()
    [ "$path" = haraka ] && n=(-n 2000) # Haraka is slow: a count, not a duration
    if [ ${#n[@]} -gt 0 ]; then
      load "$WORK/r.json" -t "127.0.0.1:${PORT[$path]}" -c "$CONNS" -m "$m" -s 4096 --no-pipelining "${n[@]}" || { echo "$path $mode: failed" >&2; continue; }
    else
      load "$WORK/r.json" -t "127.0.0.1:${PORT[$path]}" -c "$CONNS" -m "$m" -s 4096 --no-pipelining -d "$SECS" --warmup 1 || { echo "$path $mode: failed" >&2; continue; }
    fi
    rate=$(field "$WORK/r.json" msgs_per_sec)
    [ "$path" = direct ] && direct=$rate
    printf '%-10s %-11s %10s %7s\n' "$path" "$mode" "$rate" "$(ratio "$rate" "$direct")"
  done
done

#!/usr/bin/env bash
# Scenario 5, latency under load: measure the maximum closed-loop rate
# (persistent connections, 4 KiB) through smtp-edge and through HAProxy
# `mode tcp` (issue 16's peer; skipped when haproxy is not installed), then
# an open loop at 25/50/75 % of the lower of the two maxima, at the same
# rate straight to the sink, through HAProxy and through smtp-edge; reports
# p50, p99 and p99.9 from the scheduled arrival (no coordinated omission)
# and the latency each proxy adds over direct. Issue 16's target: at 50 %,
# smtp-edge's added p50 and p99 ≤ HAProxy's (with PIN=1 both proxies get
# CPU 1 alike).
# Usage: latency.sh [SECONDS_PER_RUN=8] [CONNECTIONS=200]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-8}
CONNS=${2:-200}
setup
HAP=$(free_port)
if ! command -v haproxy >/dev/null || ! start_peer haproxy start "$HAP" "$SINK"; then
  echo "HAProxy not available: smtp-edge alone" >&2
  HAP=""
fi
load "$WORK/max.json" -t "127.0.0.1:$PROXY" -c 50 -m 0 -d "$SECS" --warmup 1
MAX=$(field "$WORK/max.json" msgs_per_sec)
echo "closed-loop maximum through smtp-edge: $MAX msgs/s"
if [ -n "$HAP" ]; then
  load "$WORK/hmax.json" -t "127.0.0.1:$HAP" -c 50 -m 0 -d "$SECS" --warmup 1
  HMAX=$(field "$WORK/hmax.json" msgs_per_sec)
  echo "closed-loop maximum through HAProxy: $HMAX msgs/s"
  MAX=$(python3 -c "print(min($MAX, $HMAX))")
fi
echo "open loop at 25/50/75 % of $MAX msgs/s, the same rate on every path"
export ALLOW_INCOMPLETE=1
k=latency_us.scheduled_to_final
printf '| load | rate | path | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | dropped |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n'
for pct in 25 50 75; do
  rate=$(python3 -c "print(int($MAX*$pct/100))")
  paths=(direct smtp-edge)
  [ -n "$HAP" ] && paths=(direct haproxy smtp-edge)
  for path in "${paths[@]}"; do
    case $path in
      direct) port=$SINK ;;
      haproxy) port=$HAP ;;
      smtp-edge) port=$PROXY ;;
    esac
    load "$WORK/$path.json" -t "127.0.0.1:$port" -c "$CONNS" -m 0 --rate "$rate" -d "$SECS" --warmup 1
  done
  d50=$(field "$WORK/direct.json" $k.p50); d99=$(field "$WORK/direct.json" $k.p99)
  for path in "${paths[@]}"; do
    f="$WORK/$path.json"
    p50=$(field "$f" $k.p50); p99=$(field "$f" $k.p99); p999=$(field "$f" $k.p999)
    added="– | –"
    [ "$path" != direct ] && added="$((p50 - d50)) | $((p99 - d99))"
    printf '| %s%% | %s | %s | %s | %s | %s | %s | %s |\n' "$pct" "$rate" "$path" "$p50" "$p99" "$p999" "$added" "$(field "$f" messages.dropped)"
  done
done

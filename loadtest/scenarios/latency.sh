#!/usr/bin/env bash
# Scenario 5, latency under load: measure the maximum closed-loop rate
# through smtp-edge (persistent connections, 4 KiB), then an open loop at
# 25/50/75 % of it, straight to the sink and through smtp-edge; reports p50,
# p99 and p99.9 from the scheduled arrival (no coordinated omission) and the
# latency smtp-edge adds.
# Usage: latency.sh [SECONDS_PER_RUN=8] [CONNECTIONS=200]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-8}
CONNS=${2:-200}
setup
load "$WORK/max.json" -t "127.0.0.1:$PROXY" -c 50 -m 0 -d "$SECS" --warmup 1
MAX=$(field "$WORK/max.json" msgs_per_sec)
echo "closed-loop maximum through smtp-edge: $MAX msgs/s"
export ALLOW_INCOMPLETE=1
printf '%-6s %8s | %9s %9s %9s | %9s %9s %9s | %10s %10s | %s\n' load rate "direct p50" p99 p99.9 "edge p50" p99 p99.9 "added p50" "added p99" "dropped (direct/edge)"
for pct in 25 50 75; do
  rate=$(python3 -c "print(int($MAX*$pct/100))")
  load "$WORK/d.json" -t "127.0.0.1:$SINK" -c "$CONNS" -m 0 --rate "$rate" -d "$SECS" --warmup 1
  load "$WORK/e.json" -t "127.0.0.1:$PROXY" -c "$CONNS" -m 0 --rate "$rate" -d "$SECS" --warmup 1
  k=latency_us.scheduled_to_final
  d50=$(field "$WORK/d.json" $k.p50); d99=$(field "$WORK/d.json" $k.p99); d999=$(field "$WORK/d.json" $k.p999)
  e50=$(field "$WORK/e.json" $k.p50); e99=$(field "$WORK/e.json" $k.p99); e999=$(field "$WORK/e.json" $k.p999)
  printf '%-6s %8s | %8sus %8sus %8sus | %8sus %8sus %8sus | %8sus %8sus | %s/%s\n' "$pct%" "$rate" "$d50" "$d99" "$d999" "$e50" "$e99" "$e999" \
    "$((e50 - d50))" "$((e99 - d99))" "$(field "$WORK/d.json" messages.dropped)" "$(field "$WORK/e.json" messages.dropped)"
done

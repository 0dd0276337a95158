#!/usr/bin/env bash
# Scenario 2, connection churn: connect, EHLO, QUIT as fast as possible,
# straight to the sink and through smtp-edge; connections/s, the ratio, and
# smtp-edge's CPU per connection.
# Usage: churn.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
setup
d=(); e=(); cpu=()
for _ in $(seq 1 "$REPS"); do
  load "$WORK/d.json" -t "127.0.0.1:$SINK" -c "$CONNS" --churn -d "$SECS" --warmup 1
  load "$WORK/e.json" -t "127.0.0.1:$PROXY" -c "$CONNS" --churn -d "$SECS" --warmup 1 --watch-pid "$EDGE_PID"
  d+=("$(field "$WORK/d.json" conns_per_sec)")
  e+=("$(field "$WORK/e.json" conns_per_sec)")
  cpu+=("$(field "$WORK/e.json" server.cpu_s_per_1000)")
done
dm=$(median "${d[@]}"); em=$(median "${e[@]}")
printf '%-12s %12s %12s %7s %22s\n' scenario direct/s edge/s ratio "edge cpu/connection"
printf '%-12s %12s %12s %7s %22s\n' churn "$dm" "$em" "$(ratio "$em" "$dm")" "$(python3 -c "print(round(float('$(median "${cpu[@]}")')*1000,1))") us"

#!/usr/bin/env bash
# Scenario 1, relay throughput: the same closed-loop load straight to the
# sink and through smtp-edge, alternated in one run; reports msgs/s, the
# ratio to direct, and smtp-edge's CPU per 1000 messages. Connection modes:
# new connection per message and persistent; sizes 4 KiB and 100 KiB.
# Usage: throughput.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
setup
printf '%-10s %-8s %-10s %10s %10s %7s %14s\n' mode size pipelining direct/s edge/s ratio "edge cpu/1k"
for size in 4096 102400; do
  for mode in new persistent; do
    for pipe in on off; do
      m=1; [ "$mode" = persistent ] && m=0
      extra=(); [ "$pipe" = off ] && extra=(--no-pipelining)
      d=(); e=(); cpu=()
      for _ in $(seq 1 "$REPS"); do
        load "$WORK/d.json" -t "127.0.0.1:$SINK" -c "$CONNS" -m "$m" -s "$size" -d "$SECS" --warmup 1 "${extra[@]}"
        load "$WORK/e.json" -t "127.0.0.1:$PROXY" -c "$CONNS" -m "$m" -s "$size" -d "$SECS" --warmup 1 "${extra[@]}" --watch-pid "$EDGE_PID"
        d+=("$(field "$WORK/d.json" msgs_per_sec)")
        e+=("$(field "$WORK/e.json" msgs_per_sec)")
        cpu+=("$(field "$WORK/e.json" server.cpu_s_per_1000)")
      done
      dm=$(median "${d[@]}"); em=$(median "${e[@]}")
      printf '%-10s %-8s %-10s %10s %10s %7s %14s\n' "$mode" "$size" "$pipe" "$dm" "$em" "$(ratio "$em" "$dm")" "$(median "${cpu[@]}")s"
    done
  done
done

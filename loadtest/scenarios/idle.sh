#!/usr/bin/env bash
# Scenario 3, idle concurrency: open as many idle (greeted, EHLO'd)
# connections to smtp-edge as the fd limit allows (default 15000), from
# several 127.0.0.x source addresses, and report smtp-edge's RSS per idle
# connection.
# Usage: idle.sh [CONNECTIONS=15000] [HOLD_SECONDS=5]
source "$(dirname "$0")/../lib.sh"
N=${1:-15000}
HOLD=${2:-5}
# The default global cap (policy.limits.max_connections = 10000) would
# refuse past 10 000: lift it to what is asked.
setup none "[policy.limits]
max_connections = $((N + 100))"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "fd limit: $(ulimit -n)"
"$LOAD" idle -t "127.0.0.1:$PROXY" -c "$N" --hold "$HOLD" --bind 127.0.0.2-127.0.0.20 --watch-pid "$EDGE_PID" --json >"$WORK/idle.json" 2>"$WORK/idle.err" || true
printf '%-10s %8s %10s %14s %14s %16s\n' requested opened failed "rss before" "rss peak" "bytes/conn"
printf '%-10s %8s %10s %14s %14s %16s\n' "$N" "$(field "$WORK/idle.json" peak_open)" \
  "$(python3 -c 'import json,sys; f=json.load(open(sys.argv[1]))["failed"]; print(sum(f.values()))' "$WORK/idle.json")" \
  "$(field "$WORK/idle.json" server.rss_kib_before) KiB" "$(field "$WORK/idle.json" server.rss_kib_peak) KiB" \
  "$(field "$WORK/idle.json" server.rss_bytes_per_conn)"

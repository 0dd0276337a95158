#!/usr/bin/env bash
# wake.sh NAME: at saturation (persistent, 400 sessions, 4 KiB, pipelined,
# the proxy alone on CPU 1, the load on CPU 0), who wakes whom
# (`sched:sched_wakeup`, the whole machine) and where CPU 1's time goes by
# symbol (`cpu-clock`), per message. PEER=haproxy runs HAProxy instead of
# smtp-edge. Output in $PROF_DIR/NAME: wakeups.txt, symbols.txt.
set -eu
NAME=$1; CONNS=${CONNS:-400}; SECS=${SECS:-4}
LOAD_ON="taskset -c 0"
EXTRA=""
source "$(dirname "$0")/common.sh"
if [ "${PEER:-}" = haproxy ]; then
  taskset -c 1 "$(dirname "$0")/../peers/haproxy.sh" start "$W/hap" "$EP" "127.0.0.1:$SINKP" > "$W/hap.log" 2>&1
  EPID=$(cat "$W/hap/haproxy.pid")
else
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$EDGE" --config "$W/edge.toml" > "$W/edge.log" 2>&1 & EPID=$!
fi
wait_edge
$LOAD_ON "$R/smtp-load" run -t 127.0.0.1:$EP -c "$CONNS" -m 0 -d $((SECS + 3)) -s 4096 -q > "$W/load.txt" 2>&1 & LPID=$!
sleep 2
perf record -q -a -e sched:sched_wakeup -e cpu-clock -o "$W/perf.data" -- sleep "$SECS" 2>/dev/null
wait $LPID || true
if [ "${PEER:-}" = haproxy ]; then "$(dirname "$0")/../peers/haproxy.sh" stop "$W/hap" >/dev/null 2>&1 || true; else kill $EPID 2>/dev/null; fi
kill $SPID 2>/dev/null; wait 2>/dev/null || true
RATE=$(awk '/^rate/ {print $2; exit}' "$W/load.txt")
MSGS=$(awk -v r="$RATE" -v s="$SECS" 'BEGIN {print r * s}')
echo "$NAME: $RATE msgs/s"
perf script -i "$W/perf.data" -F comm,cpu,event,trace 2>/dev/null | awk -v m="$MSGS" '$3 ~ /sched_wakeup/ {w=$1; match($0,/comm=[^ ]+/); t=substr($0,RSTART+5,RLENGTH-5); c[w" "$2" -> "t]++} END {for (k in c) printf "%8.4f per msg  %s\n", c[k]/m, k}' | sort -rn | head -8 | tee "$W/wakeups.txt"
# cpu-clock samples on CPU 1 (their period in ns) as µs per message, by symbol.
perf script -i "$W/perf.data" -F event,cpu,period,ip,sym,dso 2>/dev/null | python3 -c '
import re, sys, collections
m = float(sys.argv[1]); t = collections.Counter(); user = 0
for l in sys.stdin:
    r = re.match(r"\[(\d+)\]\s+(\d+)\s+cpu-clock:\s+[0-9a-f]+\s+(.*)\s+\((.*)\)$", l.strip())
    if not r or r.group(1) != "001": continue
    ns = int(r.group(2)); kernel = "kernel" in r.group(4)
    t[r.group(3) + ("" if kernel else " (user)")] += ns; user += 0 if kernel else ns
print(f"{sum(t.values())/1e3/m:8.3f} us/msg on CPU 1, {user/1e3/m:.3f} in user space")
for k, v in t.most_common(40): print(f"{v/1e3/m:8.3f} {k[:110]}")
' "$MSGS" > "$W/symbols.txt"
head -25 "$W/symbols.txt"

#!/usr/bin/env bash
# Scenario 11, system calls per relayed message (issue 16: "fewer syscalls
# per message than a byte copier"): the same closed-loop load (persistent
# sessions, 4 KiB, client pipelining on and off) through smtp-edge and
# through HAProxy `mode tcp`, each in front of the same sink, counting every
# system call the proxy enters (`perf stat -e raw_syscalls:sys_enter -p`)
# while the load runs, and its CPU per 1 000 messages. Paths interleaved per
# repeat; medians. Needs perf (linux-perf) and haproxy.
# Usage: syscalls.sh [SECONDS_PER_RUN=4] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-4}
REPS=${2:-3}
CONNS=${3:-50}
command -v perf >/dev/null || { echo "syscalls.sh needs perf (apt-get install linux-perf)" >&2; exit 1; }
setup
HAP=$(free_port)
start_peer haproxy start "$HAP" "$SINK" || { echo "haproxy did not start: $(tail -1 "$PEER_DIR.log")" >&2; exit 1; }
HAP_DIR=$PEER_DIR
declare -A N
for pipe in on off; do
  args=(-c "$CONNS" -m 0 -s 4096 -d "$SECS" --warmup 1)
  [ "$pipe" = off ] && args+=(--no-pipelining)
  for r in $(seq 1 "$REPS"); do
    for path in smtp-edge haproxy; do
      if [ "$path" = smtp-edge ]; then
        port=$PROXY pids=$EDGE_PID
      else
        port=$HAP pids=$(peer_pids haproxy "$HAP_DIR" | paste -sd,)
      fi
      out="$WORK/$path.$pipe.$r"
      # Counted from the end of the warm-up to the end of the run.
      (sleep 1 && exec perf stat -x, -e raw_syscalls:sys_enter -p "$pids" -o "$out.perf" -- sleep "$SECS") &
      counter=$!
      watch=()
      for p in ${pids//,/ }; do watch+=(--watch-pid "$p"); done
      load "$out.json" -t "127.0.0.1:$port" "${args[@]}" "${watch[@]}"
      wait "$counter"
      N[$path.$pipe]="${N[$path.$pipe]:-} $out"
    done
  done
done
printf '| pipelining | path | msgs/s | syscalls per message | CPU per 1 000 msgs |\n|---|---|---:|---:|---:|\n'
for pipe in on off; do
  for path in smtp-edge haproxy; do
    # shellcheck disable=SC2086 # a list of file stems
    python3 - "$pipe" "$path" ${N[$path.$pipe]} <<'PY'
import json, statistics, sys
pipe, path, stems = sys.argv[1], sys.argv[2], sys.argv[3:]
rate, per, cpu = [], [], []
for s in stems:
    j = json.load(open(s + ".json"))
    calls = 0
    for line in open(s + ".perf"):
        f = line.strip().split(",")
        if len(f) > 2 and f[2].startswith("raw_syscalls:sys_enter") and f[0].isdigit():
            calls += int(f[0])
    rate.append(j["msgs_per_sec"])
    per.append(calls / max(1, j["messages"]["accepted"]))
    c = (j.get("server") or {}).get("cpu_s_per_1000")
    if c is not None:
        cpu.append(c)
m = statistics.median
print("| %s | %s | %.0f | %.2f (%.2f–%.2f) | %s |" % (pipe, path, m(rate), m(per), min(per), max(per), ("%.3f s" % m(cpu)) if cpu else "-"))
PY
  done
done

#!/usr/bin/env bash
# Scenario 11, system calls per relayed message (issue 16: "fewer syscalls
# per message than a byte copier"): the same closed-loop load (persistent
# sessions, 4 KiB, client pipelining on and off) through smtp-edge and
# through HAProxy `mode tcp`, each in front of the same sink, counting every
# system call the proxy enters (`perf stat -e raw_syscalls:sys_enter -p`)
# while the load runs, and its CPU per 1 000 messages; beside them the TCP
# segments the whole machine sent per message, the machine's wake-ups per
# message and how idle CPU 0 (the load side with PIN=1) was. Paths
# interleaved per repeat; medians. Needs perf (linux-perf) and haproxy.
# Usage: syscalls.sh [SECONDS_PER_RUN=4] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-4}
REPS=${2:-3}
CONNS=${3:-50}
command -v perf >/dev/null || { echo "syscalls.sh needs perf (apt-get install linux-perf)" >&2; exit 1; }
# The machine's count of TCP segments sent (/proc/net/snmp, Tcp OutSegs).
tcp_out_segs() {
  awk '$1 == "Tcp:" { if (!h) { for (i = 1; i <= NF; i++) if ($i == "OutSegs") c = i; h = 1 } else print $c }' /proc/net/snmp
}
# CPU 0's idle time so far, in clock ticks (/proc/stat).
cpu0_idle() {
  awk '$1 == "cpu0" { print $5 + $6 }' /proc/stat
}
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
      # TCP segments sent on the whole machine over the same window: every
      # hop of the loopback (generator, proxy, sink) in both directions.
      (sleep 1 && tcp_out_segs >"$out.segs" && sleep "$SECS" && tcp_out_segs >>"$out.segs") &
      segs=$!
      # Wake-ups on the whole machine, and how idle the load side's CPU
      # (CPU 0 with PIN=1: the generator and the sink) was: each time it
      # went idle, the proxy's next send had to wake it (section 22).
      (sleep 1 && cpu0_idle >"$out.idle" && exec perf stat -a -x, -e sched:sched_wakeup,sched:sched_switch -o "$out.wake" -- sleep "$SECS") &
      wake=$!
      watch=()
      for p in ${pids//,/ }; do watch+=(--watch-pid "$p"); done
      load "$out.json" -t "127.0.0.1:$port" "${args[@]}" "${watch[@]}"
      wait "$counter" "$segs" "$wake"
      cpu0_idle >>"$out.idle"
      N[$path.$pipe]="${N[$path.$pipe]:-} $out"
    done
  done
done
printf '| pipelining | path | msgs/s | syscalls per message | TCP segments per message (all hops) | wake-ups per message (machine) | CPU 0 idle | CPU per 1 000 msgs |\n|---|---|---:|---:|---:|---:|---:|---:|\n'
for pipe in on off; do
  for path in smtp-edge haproxy; do
    # shellcheck disable=SC2086 # a list of file stems
    python3 - "$pipe" "$path" "$SECS" ${N[$path.$pipe]} <<'PY'
import json, os, statistics, sys
pipe, path, secs, stems = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
rate, per, seg, wake, idle, cpu = [], [], [], [], [], []
for s in stems:
    j = json.load(open(s + ".json"))
    calls = 0
    for line in open(s + ".perf"):
        f = line.strip().split(",")
        if len(f) > 2 and f[2].startswith("raw_syscalls:sys_enter") and f[0].isdigit():
            calls += int(f[0])
    rate.append(j["msgs_per_sec"])
    per.append(calls / max(1, j["messages"]["accepted"]))
    a, b = (int(x) for x in open(s + ".segs").read().split())
    seg.append((b - a) / max(1, j["messages"]["accepted"]))
    for line in open(s + ".wake"):
        f = line.strip().split(",")
        if len(f) > 2 and f[2].startswith("sched:sched_wakeup") and f[0].isdigit():
            wake.append(int(f[0]) / max(1, j["messages"]["accepted"]))
    a, b = (int(x) for x in open(s + ".idle").read().split())
    idle.append((b - a) / os.sysconf("SC_CLK_TCK") / secs)
    c = (j.get("server") or {}).get("cpu_s_per_1000")
    if c is not None:
        cpu.append(c)
m = statistics.median
print("| %s | %s | %.0f | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %.3f | %.0f %% | %s |" % (pipe, path, m(rate), m(per), min(per), max(per), m(seg), min(seg), max(seg), m(wake), 100 * m(idle), ("%.3f s" % m(cpu)) if cpu else "-"))
PY
  done
done

#!/usr/bin/env bash
# threads.sh NAME EXTRA_TOML [SECS=5] [LOG=info] [M=0]: user and system
# CPU per message of each smtp-edge thread (/proc/PID/task/*/stat),
# context switches and minor faults, during a closed-loop run (50
# connections, 4 KiB; M messages per connection, 0 = persistent) with the
# proxy on CPU 1 (one worker) and the load side on CPU 0, as PIN=1 runs.
# Says which thread pays (the session worker, the span batch thread, the
# export runtime, the log thread).
set -eu
NAME=$1; EXTRA=$2; SECS=${3:-5}; LOG=${4:-info}; M=${5:-0}
LOAD_ON="taskset -c 0"
source "$(dirname "$0")/common.sh"
TOKIO_WORKER_THREADS=1 RUST_LOG=$LOG taskset -c 1 "$EDGE" --config $W/edge.toml > $W/edge.log 2>&1 & EPID=$!
wait_edge
snap() { for t in /proc/$EPID/task/*; do echo "$(cat $t/comm | tr ' ' _) $(awk "{print \$14, \$15, \$10}" $t/stat) $(grep -E '^(voluntary|nonvoluntary)' $t/status | awk '{print $2}' | tr '\n' ' ')"; done | sort; }
taskset -c 0 $R/smtp-load run -t 127.0.0.1:$EP -c 50 -m $M -d 1 -s 4096 -q >/dev/null 2>&1
snap > $W/s0
taskset -c 0 $R/smtp-load run -t 127.0.0.1:$EP -c 50 -m $M -d $SECS -s 4096 -q --json > $W/load.json 2>/dev/null
snap > $W/s1
kill $EPID; wait $EPID 2>/dev/null || true
kill $SPID $OPID 2>/dev/null; wait 2>/dev/null || true
python3 - $W <<'PY'
import sys, json
w = sys.argv[1]
j = json.load(open(w + "/load.json"))
n = j["messages"]["accepted"]
def rd(p):
    d = {}
    for l in open(p):
        f = l.split()
        k = f[0]
        while k in d: k += "+"
        d[k] = [int(x) for x in f[1:]]
    return d
a, b = rd(w + "/s0"), rd(w + "/s1")
tu = ts = 0
print(f"{w.split('/')[-1]}: {n} msgs, {j['msgs_per_sec']:.0f} msg/s")
for k in b:
    x = a.get(k, [0, 0, 0, 0, 0]); y = b[k]
    du, ds = y[0] - x[0], y[1] - x[1]
    tu += du; ts += ds
    cs = (y[3] - x[3]) + (y[4] - x[4]); pf = y[2] - x[2]
    if du + ds or cs:
        print(f"  {k:22s} user {du*1e4/n:6.2f} sys {ds*1e4/n:6.2f} us/msg  ctxsw/msg {cs/n:.3f} minflt/msg {pf/n:.3f}")
print(f"  total user {tu*1e4/n:.2f} sys {ts*1e4/n:.2f} us/msg")
PY

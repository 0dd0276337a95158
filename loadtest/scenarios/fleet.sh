#!/usr/bin/env bash
# Scenario 10, a fleet (issue 15): HAProxy (deploy/haproxy/haproxy.cfg as
# shipped: mode tcp, send-proxy-v2, leastconn, a tcplog line per session,
# here to a file; health check GET /readyz on each instance's [admin]) in
# front of two smtp-edge instances on loopback, each with a proxy_protocol
# listener trusting 127.0.0.1/32, both relaying to the smtp-load sink.
# Policy limits on everywhere, at rates no load here reaches (the point is
# what checking them costs, not refusals): connection_rate per IP and per
# /24, message_rate per IP and per /24, recipient_rate per IP, all 1 000 000
# per second with the default burst (= count: a tolerance of 1 s. With the
# shipped bursts, 20-1000, at a 1 us emission interval the tolerance is
# 20 us-1 ms: the per-/24 message_rate, burst 1000, refused a MAIL about
# once per 250 000 messages, probably a check delayed over 1 ms between
# reading the clock and updating the busy /24 key); concurrency caps 1000
# per IP, 10 000 per /24. The
# clients come from 1 000 loopback addresses (127.1.0.1-127.1.3.232, four
# /24s; BIND=... to change), so there are many quiet keys as on a real edge
# (a quiet key costs one Redis update per event: its lease is one token),
# not one hot key.
#   (1) ref:   one instance alone, plain listener, no HAProxy, local limits
#   (2) local: HAProxy + two instances, store = "local"
#   (3) redis: HAProxy + two instances, store = "redis" on a redis-server
#              started per run on a free port (--save '' --appendonly no),
#              [policy.limits.redis] timeout 0.05, on_failure "local"
# Closed loop, 4 KiB, pipelining on, new connection per message and
# persistent; a fresh sink, HAProxy, instances and Redis per run; configs
# interleaved within each repeat (order rotated per repeat); medians of the
# repeats. Per config: msgs/s and its ratio to (1), transaction p50/p99 (new
# connection: connect to final reply; persistent: MAIL to final reply), the
# proxy side's CPU per 1 000 messages (HAProxy + instances, over the
# measured interval), the instances' alone and redis-server's (both over the
# whole run, warm-up included, per message sent). The cost of shared limits is (3)/(2), per repeat and median:
# target >= 0.90. After every run each instance's /metrics is read: Redis
# calls, failures, outages, fallback checks (a Redis run must show calls
# and no fallback), enforced policy verdicts (must be 0), and HAProxy's
# sessions per instance.
# Then (4), a Redis outage: (3) with a new connection per message and then
# persistent, OUTAGE_SECS (12) s measured; redis-server is killed (SIGKILL)
# KILL_AT (3) s into the measured interval and started again on the same
# port DOWN_FOR (4) s later. Both instances' /metrics are read every 0.5 s:
# when each went degraded and came back, msgs/s before, during and after.
# No mail may fail: smtp-load's rejected/failed/dropped all 0, every message
# accepted, and the sink received exactly the messages accepted.
# Every run checks the same. Exits 1 when a message was lost or refused.
# PIN=1: the proxy side (HAProxy and both instances, one worker thread
# each; HAProxy then runs one thread) on CPU 1; the load generator, the
# sink and redis-server on CPU 0 (Redis stands for a separate host: its CPU
# is reported, not charged to the proxy side). (1) has its one instance
# alone on CPU 1. Without PIN everything shares both cores, and HAProxy and
# each instance run two threads.
# Usage: fleet.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
BIND=${BIND:-127.1.0.1-127.1.3.232}
OUTAGE_SECS=${OUTAGE_SECS:-12}
KILL_AT=${KILL_AT:-3}
DOWN_FOR=${DOWN_FOR:-4}
HAPROXY=${HAPROXY:-haproxy}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
HAPROXY_CFG=$ROOT/deploy/haproxy/haproxy.cfg
CONFIGS=(ref local redis)
# A run with refused or lost mail is still reported (then exit 1).
export ALLOW_INCOMPLETE=1
declare -A LABEL=(
  [ref]="(1) one instance, no HAProxy"
  [local]="(2) HAProxy + 2, local"
  [redis]="(3) HAProxy + 2, redis"
)

for tool in "$HAPROXY" "$REDIS_SERVER" redis-cli curl ss; do
  command -v "$tool" >/dev/null || { echo "fleet.sh needs $tool" >&2; exit 2; }
done
build

# policy STORE [REDIS_PORT]: the [policy] tables of every instance.
policy() {
  local store=$1 rate='{ count = 1000000, period = 1 }'
  cat <<TOML
[policy.limits]
max_connections = 10000
[policy.limits.concurrency]
action = "reject"
per_ip = 1000
per_prefix = 10000
[policy.limits.connection_rate]
action = "reject"
per_ip = $rate
per_prefix = $rate
store = "$store"
[policy.limits.message_rate]
action = "reject"
per_ip = $rate
per_prefix = $rate
store = "$store"
[policy.limits.recipient_rate]
action = "reject"
per_ip = $rate
store = "$store"
TOML
  if [ "$store" = redis ]; then
    printf '[policy.limits.redis]\nurl = "redis://127.0.0.1:%s"\ntimeout = 0.05\non_failure = "local"\n' "$2"
  fi
}

# edge_toml PORT ADMIN SINK PROXY_PROTOCOL(0|1) POLICY: one instance's config.
edge_toml() {
  printf 'hostname = "edge.loadtest"\n%s\n[admin]\naddress = "127.0.0.1:%s"\n[[listener]]\naddress = "127.0.0.1:%s"\ntls = "none"\n' "$5" "$2" "$1"
  if [ "$4" = 1 ]; then
    printf 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
  fi
  printf '[[backend]]\naddress = "127.0.0.1:%s"\nmax_connections = 1000\n' "$3"
}

# A binary without the keys of issue 15 cannot run this.
edge_toml 2525 9 2526 1 "$(policy redis 6379)" >"$WORK/probe.toml"
if ! "$EDGE" check-config "$WORK/probe.toml" >"$WORK/probe.out" 2>&1; then
  echo "$EDGE does not take proxy_protocol / store = \"redis\":" >&2
  cat "$WORK/probe.out" >&2
  exit 2
fi
machine
echo "smtp-edge: $EDGE, sha256 $(sha256sum "$EDGE" | cut -c1-12), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (src/ modified)')"
echo "$("$HAPROXY" -v | head -1); $("$REDIS_SERVER" --version | cut -d' ' -f1-3)"
echo "fleet: $CONNS connections from $BIND, 4 KiB, pipelining on, ${SECS} s per run after a 1 s warm-up, $REPS repeat(s)${PIN:+, PIN=1 (HAProxy + instances on CPU 1; load, sink, redis-server on CPU 0)}"

# halt PID: stop a process started here and drop it from the cleanup list.
halt() {
  stop_pid "$1"
  forget "$1"
}

# wait_listen PORT: until something listens on PORT, without connecting (a
# connect without a PROXY header would be counted by the instance).
wait_listen() {
  for _ in $(seq 1 200); do
    [ -n "$(ss -Hltn "sport = :$1")" ] && return 0
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  return 1
}

# ticks PID: user + system CPU of a process so far, in clock ticks.
ticks() {
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

# start_instance PORT ADMIN SINK PROXY_PROTOCOL POLICY: sets EDGE_PID.
start_instance() {
  edge_toml "$@" >"$WORK/edge.$1.toml"
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  TOKIO_WORKER_THREADS=${EDGE_THREADS:-$(nproc)} RUST_LOG=${EDGE_LOG:-warn} "${EDGE_ON[@]}" "$EDGE" --config "$WORK/edge.$1.toml" >"$WORK/edge.$1.log" 2>&1 &
  EDGE_PID=$!
  PIDS+=("$EDGE_PID")
  wait_listen "$1"
  wait_port "$2"
}

# start_redis PORT: a throwaway redis-server (no persistence); sets REDIS_PID.
start_redis() {
  "${LOAD_ON[@]}" "$REDIS_SERVER" --port "$1" --bind 127.0.0.1 --save '' --appendonly no >>"$WORK/redis.$1.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 1 200); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "redis-server did not start on port $1" >&2
  cat "$WORK/redis.$1.log" >&2
  return 1
}

# hap_stat SOCKET: "name status sessions" per server of backend smtp_edge.
hap_stat() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
lines = data.decode().splitlines()
head = lines[0].lstrip("# ").split(",")
for l in lines[1:]:
    row = dict(zip(head, l.split(",")))
    if row.get("pxname") == "smtp_edge" and row.get("svname") not in ("BACKEND", None):
        print(row["svname"], row["status"], row["stot"])
PY
}

# start_haproxy FRONT E1 A1 E2 A2: the deploy file with the instances'
# /readyz as health check and a stats socket; sets HAP_PID, HAP_SOCK.
start_haproxy() {
  HAP_SOCK=$WORK/haproxy.$1.sock
  HAP_LOG=$WORK/haproxy.$1.log
  HAPROXY_BIND=127.0.0.1:$1 EDGE1=127.0.0.1:$2 EDGE1_ADMIN_PORT=$3 EDGE2=127.0.0.1:$4 EDGE2_ADMIN_PORT=$5 \
    HAPROXY_STATS=$HAP_SOCK "${EDGE_ON[@]}" "$HAPROXY" -db -f "$HAPROXY_CFG" >"$HAP_LOG" 2>&1 &
  HAP_PID=$!
  PIDS+=("$HAP_PID")
  wait_listen "$1"
  for _ in $(seq 1 100); do
    if [ -S "$HAP_SOCK" ] && [ "$(hap_stat "$HAP_SOCK" 2>/dev/null | awk '$2 == "UP"' | wc -l)" = 2 ]; then
      return 0
    fi
    sleep 0.05
  done
  echo "HAProxy: the instances are not both UP:" >&2
  hap_stat "$HAP_SOCK" >&2 || true
  tail -5 "$HAP_LOG" >&2
  return 1
}

# sink_report LOG OUT: the JSON report the sink printed when stopped.
sink_report() {
  { grep '^{' "$1" || true; } | tail -1 >"$2"
  [ -s "$2" ] || { echo "the sink printed no report:" >&2; cat "$1" >&2; return 1; }
}

# fleet_up CONFIG: a fresh sink, and (1) one instance or (2)/(3) (Redis,)
# two instances and HAProxy. Sets TARGET, SINK_PID, INST (pids), ADMINS,
# PROXY_SIDE (pids on the proxy side), REDIS_PORT/REDIS_PID (redis only).
fleet_up() {
  local cfg=$1 store=local e1 e2 a1 a2 front pol
  SINK=$(free_port)
  start_sink "$SINK" --json
  REDIS_PID="" REDIS_PORT="" HAP_PID=""
  if [ "$cfg" = redis ]; then
    store=redis
    REDIS_PORT=$(free_port)
    start_redis "$REDIS_PORT"
  fi
  pol=$(policy "$store" "$REDIS_PORT")
  e1=$(free_port) a1=$(free_port)
  if [ "$cfg" = ref ]; then
    start_instance "$e1" "$a1" "$SINK" 0 "$pol"
    INST=("$EDGE_PID") ADMINS=("$a1") PORTS=("$e1") PROXY_SIDE=("$EDGE_PID")
    TARGET=$e1
    return
  fi
  start_instance "$e1" "$a1" "$SINK" 1 "$pol"
  local p1=$EDGE_PID
  e2=$(free_port) a2=$(free_port)
  start_instance "$e2" "$a2" "$SINK" 1 "$pol"
  INST=("$p1" "$EDGE_PID") ADMINS=("$a1" "$a2") PORTS=("$e1" "$e2")
  front=$(free_port)
  start_haproxy "$front" "$e1" "$a1" "$e2" "$a2"
  PROXY_SIDE=("$HAP_PID" "${INST[@]}")
  TARGET=$front
}

# fleet_down OUT: read the counters (instances' /metrics, HAProxy's stats,
# Redis' command stats), stop everything, keep the sink's report and the
# instances' and HAProxy's logs (HAProxy's counted: one line per session).
fleet_down() {
  local out=$1 i
  for i in "${!ADMINS[@]}"; do
    curl -sf "http://127.0.0.1:${ADMINS[$i]}/metrics" >"$out.metrics.$((i + 1))" || true
  done
  if [ -n "$HAP_PID" ]; then
    hap_stat "$HAP_SOCK" >"$out.haproxy" || true
    halt "$HAP_PID"
    grep -c ' smtp smtp_edge/' "$HAP_LOG" >"$out.haproxy.lines" || true
    grep -v ' smtp smtp_edge/' "$HAP_LOG" | tail -20 >"$out.haproxy.log" || true
    rm -f "$HAP_LOG" "$HAP_SOCK"
  fi
  if [ -n "$REDIS_PID" ]; then
    redis-cli -p "$REDIS_PORT" info commandstats >"$out.redis" 2>/dev/null || true
  fi
  for i in "${INST[@]}"; do halt "$i"; done
  for i in "${!PORTS[@]}"; do
    mv "$WORK/edge.${PORTS[$i]}.log" "$out.edge.$((i + 1)).log" 2>/dev/null || true
    rm -f "$WORK/edge.${PORTS[$i]}.toml"
  done
  halt "$SINK_PID"
  sink_report "$WORK/sink.$SINK.log" "$out.sink"
  rm -f "$WORK/sink.$SINK.log"
  if [ -n "$REDIS_PID" ]; then
    halt "$REDIS_PID"
  fi
}

# cpu_snap OUT SUFFIX: CPU ticks of the proxy side's processes and Redis.
cpu_snap() {
  local p
  {
    if [ -n "$HAP_PID" ]; then echo "haproxy $(ticks "$HAP_PID")"; fi
    for p in "${INST[@]}"; do echo "edge $(ticks "$p")"; done
    if [ -n "$REDIS_PID" ]; then echo "redis $(ticks "$REDIS_PID")"; fi
  } >"$1.cpu.$2"
}

# one_run CONFIG M OUT: one measured run on a fresh fleet.
one_run() {
  local cfg=$1 m=$2 out=$3 w=()
  fleet_up "$cfg"
  for p in "${PROXY_SIDE[@]}"; do w+=(--watch-pid "$p"); done
  cpu_snap "$out" 0
  load "$out" -t "127.0.0.1:$TARGET" --bind "$BIND" -c "$CONNS" -m "$m" -s 4096 -d "$SECS" --warmup 1 "${w[@]}"
  cpu_snap "$out" 1
  fleet_down "$out"
}

head -1 /proc/stat >"$WORK/stat.0"
times >"$WORK/times.0"
interleaved_runs "$REPS" "${CONFIGS[@]}"
head -1 /proc/stat >"$WORK/stat.1"
times >"$WORK/times.1"

# (4) the outage: (3) with redis-server killed and started again mid-run.
# timeline ADMIN1 ADMIN2 T0 OUT: both instances' counters every 0.5 s.
timeline() {
  trap 'exit 0' TERM
  while :; do
    local t line="" a
    t=$(python3 -c "import time; print(round(time.time() - $3, 2))")
    for a in "$1" "$2"; do
      line="$line $("${LOAD_ON[@]}" curl -sf "http://127.0.0.1:$a/metrics" | awk '
        $1 == "smtp_edge_redis_degraded" {d = $2}
        $1 == "smtp_edge_redis_fallback_checks_total" {f = $2}
        $1 == "smtp_edge_messages_relayed_total" {r = $2}
        $1 == "smtp_edge_redis_calls_total" {c = $2}
        END {printf "%s %s %s %s", d, f, r, c}')"
    done
    echo "$t$line" >>"$4"
    sleep 0.5
  done
}

for mode in new persistent; do
  m=1
  [ "$mode" = persistent ] && m=0
  out=$WORK/outage.$mode.json
  # The Redis link's log lines, probes included, with their times.
  EDGE_LOG=${EDGE_LOG:-warn,smtp_edge::policy::limits::redis=debug} fleet_up redis
  t0=$(date +%s.%N)
  echo "t0 $t0" >"$out.events"
  timeline "${ADMINS[0]}" "${ADMINS[1]}" "$t0" "$out.timeline" &
  tl=$!
  PIDS+=("$tl")
  cpu_snap "$out" 0
  load "$out" -t "127.0.0.1:$TARGET" --bind "$BIND" -c "$CONNS" -m "$m" -s 4096 -d "$OUTAGE_SECS" --warmup 1 \
    --watch-pid "$HAP_PID" --watch-pid "${INST[0]}" --watch-pid "${INST[1]}" &
  lp=$!
  sleep $((1 + KILL_AT))
  echo "kill $(python3 -c "import time; print(round(time.time() - $t0, 3))")" >>"$out.events"
  kill -KILL "$REDIS_PID"
  wait "$REDIS_PID" 2>/dev/null || true
  forget "$REDIS_PID"
  sleep "$DOWN_FOR"
  start_redis "$REDIS_PORT"
  # start_redis returns once redis-server answers PING.
  echo "start $(python3 -c "import time; print(round(time.time() - $t0, 3))")" >>"$out.events"
  wait "$lp" || true
  cpu_snap "$out" 1
  halt "$tl"
  fleet_down "$out"
done

# Other work on the machine (a niced build, say) competes with every run.
# Ours: the CPU time of everything this script started and reaped (bash's
# `times`, children); the rest of the busy time went to other processes.
python3 - "$WORK/stat.0" "$WORK/stat.1" "$WORK/times.0" "$WORK/times.1" <<'PY'
import os, re, sys
a, b = ([int(x) for x in open(f).read().split()[1:]] for f in sys.argv[1:3])
d = [y - x for x, y in zip(a, b)]
hz = os.sysconf("SC_CLK_TCK")

def secs(f):
    vals = re.findall(r"(\d+)m([\d.]+)s", open(f).read())
    return sum(int(m) * 60 + float(s) for m, s in vals)

# user + nice + system: time in processes (softirq, where loopback traffic
# is processed, is counted apart and not charged to a process).
busy = (d[0] + d[1] + d[2]) / hz
ours = secs(sys.argv[4]) - secs(sys.argv[3])
print("during the runs: %.0f %% of the machine's CPU time went to niced processes (not ours), %.0f %% idle, %.0f %% steal;"
      " %.0f %% softirq; processes not started by this script used %.0f %% of it (%.1f of the %.1f CPU-seconds spent in processes)"
      % (100 * d[1] / sum(d), 100 * d[3] / sum(d), 100 * d[7] / sum(d), 100 * d[6] / sum(d),
         100 * max(busy - ours, 0) / (sum(d) / hz), max(busy - ours, 0), busy))
PY

labels=()
for c in "${CONFIGS[@]}"; do labels+=("${LABEL[$c]}"); done
python3 - "$WORK" "$REPS" "$KILL_AT" "$DOWN_FOR" "${CONFIGS[@]}" -- "${labels[@]}" <<'PY'
import glob, json, os, re, statistics, sys
args = sys.argv[1:]
sep = args.index("--")
work, reps, kill_at, down_for = args[0], int(args[1]), float(args[2]), float(args[3])
configs, labels = args[4:sep], args[sep + 1:]
label = dict(zip(configs, labels))
HZ = os.sysconf("SC_CLK_TCK")
bad = []

def js(p):
    with open(p) as f:
        return json.load(f)

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def metrics(p):
    """name{labels} -> value from one /metrics scrape."""
    m = {}
    if not os.path.exists(p):
        return m
    for l in open(p):
        if l.startswith("#") or not l.strip():
            continue
        k, v = l.rsplit(None, 1)
        m[k] = float(v)
    return m

def msum(ms, pat):
    return sum(v for m in ms for k, v in m.items() if re.fullmatch(pat, k))

def failures(ms):
    """Failed Redis calls by reason, both instances."""
    c = {}
    for m in ms:
        for k, v in m.items():
            g = re.fullmatch(r'smtp_edge_redis_failures_total\{reason="(\w+)"\}', k)
            if g:
                c[g.group(1)] = c.get(g.group(1), 0) + v
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(c.items()) if v) or "none"

def cpu(p):
    """process kind -> CPU seconds over the load command (warm-up included)."""
    try:
        a = [l.split() for l in open(p + ".cpu.0")]
        b = [l.split() for l in open(p + ".cpu.1")]
    except OSError:
        return {}
    d = {}
    for (k, x), (_, y) in zip(a, b):
        d[k] = d.get(k, 0) + (float(y) - float(x)) / HZ
    return d

def check(p, what):
    """Every message accepted, none lost; the sink got exactly those."""
    j = js(p)
    msg = j["messages"]
    errs = []
    if not (msg["accepted"] == msg["attempted"] and msg["rejected"] == msg["failed"] == msg["dropped"] == 0):
        errs.append(f"messages {msg}")
    try:
        s = js(p + ".sink")["messages"]
        if s != msg["accepted"] + msg["warmup"]:
            errs.append(f"sink received {s}, client got 250 for {msg['accepted'] + msg['warmup']} (warm-up included)")
    except (OSError, ValueError, KeyError):
        errs.append("no sink report")
    ms = [metrics(f) for f in sorted(glob.glob(p + ".metrics.*"))]
    enforced = {k.split('"')[1]: v for k in {k for m in ms for k in m} for v in [sum(m.get(k, 0) for m in ms)]
                if re.fullmatch(r'smtp_edge_policy_verdicts_total\{.*action="enforced"\}', k) and v}
    if enforced:
        errs.append("policy verdicts enforced: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(enforced.items())))
    for e in errs:
        bad.append(f"{what}: {e}")
    return not errs

fmt = "%-11s %-30s %9s %7s %7s %7s %12s %7s %11s %7s %12s"
print(fmt % ("mode", "config", "msgs/s", "vs (1)", "p50 ms", "p99 ms", "proxy cpu/1k", "vs (2)", "inst cpu/1k", "vs (2)", "redis cpu/1k"))
cost = {}
notes = []
for mode in ("new", "persistent"):
    rate = {c: [] for c in configs}
    rows = {}
    for c in configs:
        p50, p99, pcpu, hcpu, rcpu = [], [], [], [], []
        for r in range(1, reps + 1):
            p = f"{work}/{mode}.{c}.{r}.json"
            j = js(p)
            check(p, f"{mode} {label[c]} repeat {r}")
            rate[c].append(j["msgs_per_sec"])
            p50.append(j["latency_us"]["transaction"]["p50"] / 1000)
            p99.append(j["latency_us"]["transaction"]["p99"] / 1000)
            pcpu.append((j.get("server") or {}).get("cpu_s_per_1000"))
            sent = j["messages"]["attempted"] + j["messages"]["warmup"]
            d = cpu(p)
            if "edge" in d and sent:
                hcpu.append(d["edge"] / sent * 1000)
            if "redis" in d and sent:
                rcpu.append(d["redis"] / sent * 1000)
        rows[c] = (med(rate[c]), med(p50), med(p99), med(pcpu), med(hcpu), med(rcpu))
    for c in configs:
        m, a, b, pc, hc, rc = rows[c]
        base = rows["ref"][0]
        lc, li = rows["local"][3], rows["local"][4]
        print(fmt % (mode, label[c], "%.1f" % m, "%.3f" % (m / base), "%.2f" % a, "%.2f" % b,
                     "%.3fs" % pc if pc is not None else "?",
                     "%.3f" % (pc / lc) if pc is not None and lc and c != "ref" else "-",
                     "%.3fs" % hc if hc is not None else "-",
                     "%.3f" % (hc / li) if hc is not None and li and c != "ref" else "-",
                     "%.3fs" % rc if rc is not None else "-"))
    paired = [x / y for x, y in zip(rate["redis"], rate["local"]) if y]
    cost[mode] = (rows["redis"][0] / rows["local"][0], min(paired), max(paired),
                  rows["redis"][2] / rows["local"][2])

print()
print("cost of shared limits, (3)/(2) msgs/s (target >= 0.90):")
for mode, (c, lo, hi, lat) in cost.items():
    print("  %-10s %.3f (per repeat %.3f..%.3f), p99 latency (3)/(2) %.2f: %s"
          % (mode, c, lo, hi, lat, "met" if c >= 0.90 else "MISSED"))

print()
print("instances' /metrics after each run (both instances summed; median over the repeats):")
fmt2 = "%-11s %-30s %11s %11s %9s %8s %9s %9s %15s"
print(fmt2 % ("mode", "config", "redis calls", "evalsha", "fallback", "outages", "failures", "enforced", "sessions e1/e2"))
for mode in ("new", "persistent"):
    for c in configs:
        calls, ev, fb, out, fail, enf, split = [], [], [], [], [], [], []
        for r in range(1, reps + 1):
            p = f"{work}/{mode}.{c}.{r}.json"
            j = js(p)
            sent = j["messages"]["attempted"] + j["messages"]["warmup"]
            ms = [metrics(f) for f in sorted(glob.glob(p + ".metrics.*"))]
            has_redis = any("smtp_edge_redis_calls_total" in m for m in ms)
            if has_redis:
                calls.append(msum(ms, r"smtp_edge_redis_calls_total") / sent * 1000)
                fb.append(msum(ms, r"smtp_edge_redis_fallback_checks_total"))
                out.append(msum(ms, r"smtp_edge_redis_outages_total"))
                fail.append(msum(ms, r"smtp_edge_redis_failures_total\{.*\}"))
                if fb[-1] or out[-1] or fail[-1]:
                    notes.append(f"{mode} {label[c]} repeat {r}: {fb[-1]:.0f} checks fell back to the local limiters "
                                 f"({out[-1]:.0f} outage(s), failed calls: {failures(ms)})")
            if os.path.exists(p + ".redis"):
                t = open(p + ".redis").read()
                e = re.search(r"cmdstat_evalsha:calls=(\d+)", t)
                if e and sent:
                    ev.append(int(e.group(1)) / sent)
            enf.append(msum(ms, r'smtp_edge_policy_verdicts_total\{.*action="enforced"\}'))
            if os.path.exists(p + ".haproxy"):
                st = [l.split() for l in open(p + ".haproxy") if l.strip()]
                tot = sum(int(x[2]) for x in st)
                if tot:
                    split.append("/".join("%.0f" % (100 * int(x[2]) / tot) for x in st))
        print(fmt2 % (mode, label[c],
                      "%.0f/1k msg" % med(calls) if calls else "none",
                      "%.2f/msg" % med(ev) if ev else "-",
                      "%.0f" % med(fb) if fb else "-",
                      "%.0f" % med(out) if out else "-",
                      "%.0f" % med(fail) if fail else "-",
                      "%.0f" % med(enf),
                      (split[0] + " %") if split else "-"))
        logs = []
        for r in range(1, reps + 1):
            for f in sorted(glob.glob(f"{work}/{mode}.{c}.{r}.json.edge.*.log")):
                logs += [l.strip() for l in open(f) if l.strip()]
        if logs:
            notes.append(f"{mode} {label[c]}: the instances logged {len(logs)} line(s), e.g. {logs[0][:220]}")
for n in notes:
    print("  " + n)

print()
print(f"(4) Redis outage: HAProxy + 2 instances, store = \"redis\", redis-server killed (SIGKILL) {kill_at:.0f} s into the measured interval and started again {down_for:.0f} s later")
for mode in ("new", "persistent"):
    p = f"{work}/outage.{mode}.json"
    if not os.path.exists(p):
        continue
    j = js(p)
    ok = check(p, f"outage {mode}")
    msg = j["messages"]
    sink = js(p + ".sink")["messages"] if os.path.exists(p + ".sink") else None
    ev = dict(l.split() for l in open(p + ".events"))
    tk, ts = float(ev["kill"]), float(ev["start"])
    tl = [list(map(float, l.split())) for l in open(p + ".timeline") if len(l.split()) == 9]
    ms = [metrics(f) for f in sorted(glob.glob(p + ".metrics.*"))]
    lat = j["latency_us"]["transaction"]
    print(f"  {mode}: attempted {msg['attempted']}, accepted {msg['accepted']}, rejected {msg['rejected']}, failed {msg['failed']}, "
          f"dropped {msg['dropped']}; sink {sink} = accepted + {msg['warmup']} warm-up: {'yes' if sink == msg['accepted'] + msg['warmup'] else 'NO'}; "
          f"{j['msgs_per_sec']:.0f} msgs/s, transaction p99 {lat['p99'] / 1000:.2f} ms, max {lat['max'] / 1000:.1f} ms; "
          f"{'no mail failed' if ok else 'MAIL FAILED'}")
    print(f"    killed at {tk:.1f} s, started again at {ts:.1f} s (since the warm-up began); counters at the end, both instances: "
          f"outages {msum(ms, r'smtp_edge_redis_outages_total'):.0f}, failed calls: {failures(ms)}; fallback checks {msum(ms, r'smtp_edge_redis_fallback_checks_total'):.0f}, calls {msum(ms, r'smtp_edge_redis_calls_total'):.0f}, "
          f"degraded now {msum(ms, r'smtp_edge_redis_degraded'):.0f}")
    import datetime
    t0 = float(ev["t0"])
    for i in (1, 2):
        f = f"{p}.edge.{i}.log"
        seen = []
        for l in open(f) if os.path.exists(f) else []:
            g = re.match(r"(\S+Z)\s+\w+\s+(.*)", l.strip())
            if not g or "redis" not in g.group(2):
                continue
            t = datetime.datetime.fromisoformat(g.group(1).replace("Z", "+00:00")).timestamp() - t0
            msg = g.group(2)
            what = ("connected" if "connected" in msg else "degraded" if "unreachable" in msg else
                    "probe failed" if "probe failed" in msg else "restored" if "restored" in msg else msg[:60])
            seen.append((what, t, msg))
        if seen:
            print(f"    instance {i} log (s since the warm-up began): " + "; ".join(f"{w} {t:.2f}" for w, t, _ in seen))
            late = [m for w, t, m in seen if w == "probe failed" and t > float(ev["start"])]
            if late:
                print(f"      a probe after the restart failed: {late[0][:200]}")
    if tl:
        for i in (0, 1):
            deg = [row[0] for row in tl if row[1 + 4 * i] == 1]
            back = [row[0] for row in tl if deg and row[0] > deg[0] and row[1 + 4 * i] == 0]
            print(f"    instance {i + 1}: degraded from {deg[0]:.1f} s to {back[0]:.1f} s (0.5 s samples)" if deg and back else
                  f"    instance {i + 1}: degraded from {deg[0]:.1f} s, not back by the last sample" if deg else
                  f"    instance {i + 1}: never seen degraded")
        def rate(t1, t2):
            pts = [row for row in tl if t1 <= row[0] <= t2]
            if len(pts) < 2:
                return None
            a, b = pts[0], pts[-1]
            return (b[3] + b[7] - a[3] - a[7]) / (b[0] - a[0])
        phases = [("before", 1.5, tk), ("Redis down", tk + 0.5, ts), ("after", ts + 1.5, tl[-1][0])]
        print("    msgs/s (relayed, both instances): " + ", ".join(
            f"{n} {r:.0f}" if r is not None else f"{n} ?" for n, r in ((n, rate(a, b)) for n, a, b in phases)))

print()
if bad:
    print("LOST OR REFUSED MAIL:")
    for b in bad:
        print("  " + b)
    sys.exit(1)
print("every run: every message accepted, none failed or dropped, the sink received exactly the messages accepted, no policy verdict enforced")
PY

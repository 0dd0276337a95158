#!/usr/bin/env bash
# Scenario 12, backend faults under load (issue 17): MESSAGES messages, each
# with its own id (smtp-load run --outcomes), through smtp-edge to two Postfix
# smtp-sink backends that dump every message they store (-d, one file per
# message) and, as root with Postfix installed (POSTFIX=0: without), a
# private real Postfix (tests/postfix_instance's main.cf and master.cf)
# delivering into a Maildir, while every FAULT_EVERY seconds one backend is
# hit, in turn: killed (SIGKILL, mid-DATA for the transactions it holds)
# and started again, frozen (SIGSTOP) and resumed, restarted answering 421
# at RCPT or 450 at MAIL, dropping the connection at DATA, dropping it after
# the dot without a reply (the message is stored, the 250 never comes
# back), slow (1 s before answering DATA), Postfix killed (`postfix abort`)
# and started (FAULT_KINDS="0 5 9" runs only those, see `fault` below).
# Afterwards (Postfix's queue delivered) `smtp-load account` compares what
# every client was told with what the backends stored: each 250 stored exactly once, a
# refused message not stored unless its dot went out and the reply was lost
# (explained). Also: the backends' health as smtp-edge's /metrics shows it
# (smtp_edge_backend_up, scraped every 0.2 s), marked down and probed back,
# and how many messages took longer than the backend connect timeout. The
# chart (messages/s, p99 and max per second, the faults marked) is written
# to CHART (default loadtest/faultrun.svg). Exits 1 when a message was lost,
# duplicated or stored unexplained.
# Usage: [POSTFIX=0] [RATE=0] [FAULT_KINDS=...] [KEEP=DIR] [CHART=FILE] faultrun.sh [MESSAGES=100000] [FAULT_EVERY=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
N=${1:-100000}
EVERY=${2:-3}
C=${3:-50}
CHART=${CHART:-$LT_DIR/faultrun.svg}
# Closed loop by default: C connections, each sending its next message as
# soon as the last one is answered, so a message's latency is its own (not
# time queued behind others). RATE=R: an open loop at R messages/s instead
# (latency then counts from the scheduled time, queueing included).
RATE=${RATE:-0}
# How long each fault lasts before the backend is restored.
HOLD=$(python3 -c "print(min(2.0, max(0.5, $EVERY - 1)))")
# Edge timeouts: a frozen backend's greeting times out after CONNECT_TIMEOUT
# s; three failed connects in a row take it out of rotation, probed every
# 0.25 s (doubling up to 1 s) until it answers.
CONNECT_TIMEOUT=1
# Backend command and end-of-data timeouts: below a freeze (HOLD, 2 s), so
# that the transactions stuck on a frozen backend time out (451), give
# their connection slots up, and the new connects' greetings time out: the
# health check then takes it out. Above the slow-DATA fault's 1 s.
BACKEND_TIMEOUT=1.5
SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SINK" ] || { echo "faultrun: needs Postfix's smtp-sink (apt-get install postfix)" >&2; exit 2; }
build
machine

STORE="$WORK/store"
mkdir -p "$STORE/a" "$STORE/b"
# smtp-sink (as nobody) must reach its dump directory.
chmod 711 "$WORK"
chmod -R 777 "$STORE"
# smtp-sink drops privileges to nobody when run as root.
SINK_USER=()
[ "$(id -u)" = 0 ] && SINK_USER=(-u nobody)
PORT_A=$(free_port)
PORT_B=$(free_port)
PORT_E=$(free_port)
PORT_ADM=$(free_port)
declare -A SPID PORT
PORT[a]=$PORT_A
PORT[b]=$PORT_B
# A frozen backend does not die of SIGTERM: resume them before cleaning up.
trap 'for p in "${SPID[@]:-}"; do kill -CONT "$p" 2>/dev/null || true; done; cleanup' EXIT INT TERM

# sink NAME [FLAGS...]: (re)start backend NAME with the fault flags given.
sink() {
  local name=$1
  shift
  "$SINK" "${SINK_USER[@]}" -m 1000 -d "$STORE/$name/%H%M%S." "$@" "127.0.0.1:${PORT[$name]}" 1024 \
    >>"$WORK/sink.$name.log" 2>&1 &
  SPID[$name]=$!
  PIDS+=("${SPID[$name]}")
  wait_port "${PORT[$name]}"
}

# unsink NAME: SIGKILL (a crash: transactions in progress are cut mid-way).
unsink() {
  local p=${SPID[$1]}
  kill -CONT "$p" 2>/dev/null || true
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  forget "$p"
}

FAULTS="$WORK/faults.txt"
: >"$FAULTS"
mark() { echo "$(date +%s.%N) $*" >>"$FAULTS"; }

sink a
sink b

# The real Postfix: a private instance (queue, Maildir, log under
# $WORK/postfix) on its own port, configured from the integration tests'
# templates.
PF_DIR="$WORK/postfix"
PF_BACKEND=""
if [ "${POSTFIX:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v postfix >/dev/null && id postfix >/dev/null 2>&1; then
  PORT_PF=$(free_port)
  mkdir -p "$PF_DIR"/{conf,queue,data,mail}
  chmod 755 "$PF_DIR" "$PF_DIR"/{conf,queue,data,mail}
  chown postfix "$PF_DIR/data"
  chown nobody:"$(id -gn nobody)" "$PF_DIR/mail"
  # Writable by Postfix's user: a start after `postfix abort` runs postsuper,
  # which writes its warnings (a half-written queue file) to this file itself
  # as that user before postlogd runs; a warning it cannot write fails the start.
  : >"$PF_DIR/maillog"
  chown postfix "$PF_DIR/maillog"
  for f in main.cf master.cf; do
    sed -e "s|{DIR}|$PF_DIR|g" -e "s|{PORT}|$PORT_PF|g" -e "s|{UID}|$(id -u nobody)|g" -e "s|{GID}|$(id -g nobody)|g" \
      "$ROOT/tests/postfix_instance/$f.in" >"$PF_DIR/conf/$f"
  done
  postfix -c "$PF_DIR/conf" start >"$WORK/postfix.start.log" 2>&1
  wait_port "$PORT_PF"
  PF_BACKEND="[[backend]]
address = \"127.0.0.1:$PORT_PF\"
max_connections = 40
down_after = 3
probe_interval = 0.25
probe_interval_max = 1"
fi
# pf_queued: messages still in Postfix's queue.
pf_queued() {
  find "$PF_DIR/queue"/{maildrop,incoming,active,deferred,hold} -type f 2>/dev/null | wc -l
}
# pf_pids: the processes of our instance (master passes MAIL_CONFIG to all).
pf_pids() { grep -l -s -a "MAIL_CONFIG=$PF_DIR/conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; }
# pf_stop: `postfix abort` (every process told to stop at once), then
# SIGKILL for what is left after 2 s: an smtpd still serving a pooled
# connection would otherwise go on accepting mail after the "stop", and an
# old qmgr overlap the new one.
pf_stop() {
  postfix -c "$PF_DIR/conf" abort >>"$WORK/postfix.start.log" 2>&1 || true
  for _ in $(seq 1 20); do [ -z "$(pf_pids)" ] && return 0; sleep 0.1; done
  # shellcheck disable=SC2046
  kill -KILL $(pf_pids) 2>/dev/null || true
}
pf_start() { postfix -c "$PF_DIR/conf" start >>"$WORK/postfix.start.log" 2>&1 || true; wait_port "$PORT_PF" || true; }
trap 'for p in "${SPID[@]:-}"; do kill -CONT "$p" 2>/dev/null || true; done; [ -z "$PF_BACKEND" ] || pf_stop; cleanup' EXIT INT TERM

cat >"$WORK/edge.toml" <<TOML
hostname = "edge.faultrun"
[timeouts]
backend_connect = $CONNECT_TIMEOUT
backend_command = $BACKEND_TIMEOUT
backend_data_end = $BACKEND_TIMEOUT
backend_pool_wait = 10
[admin]
address = "127.0.0.1:$PORT_ADM"
[[listener]]
address = "127.0.0.1:$PORT_E"
[[backend]]
address = "127.0.0.1:$PORT_A"
max_connections = 40
down_after = 3
probe_interval = 0.25
probe_interval_max = 1
[[backend]]
address = "127.0.0.1:$PORT_B"
max_connections = 40
down_after = 3
probe_interval = 0.25
probe_interval_max = 1
$PF_BACKEND
TOML
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUST_LOG=${EDGE_LOG:-warn,smtp_edge::relay::pool=info} "$EDGE" --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
EDGE_PID=$!
PIDS+=("$EDGE_PID")
wait_port "$PORT_E"

# The backends' health as /metrics shows it, every 0.2 s: "time a b [pf]"
# lines (1 = in rotation).
health() {
  while kill -0 "$EDGE_PID" 2>/dev/null; do
    curl -s "http://127.0.0.1:$PORT_ADM/metrics" | awk -v t="$(date +%s.%N)" -v a="$PORT_A" -v b="$PORT_B" -v p="${PORT_PF:-none}" '
      /^smtp_edge_backend_up\{/ {
        if (index($0, ":" a "\"")) ua = $2
        if (index($0, ":" b "\"")) ub = $2
        if (index($0, ":" p "\"")) up = $2
      }
      END { print t, ua, ub, up }'
    sleep 0.2
  done
}
health >"$WORK/health.txt" &
HEALTH_PID=$!
PIDS+=("$HEALTH_PID")

LOOP=(--rate "$RATE" --max-inflight 5000)
[ "$RATE" = 0 ] && LOOP=()
if [ "$RATE" = 0 ]; then HOW="closed loop, $C connections"; else HOW="open loop at $RATE msgs/s, at most $C connections"; fi
echo "faultrun: $N messages of 4 KiB ($HOW, 10 messages per connection) through smtp-edge to two smtp-sink backends${PF_BACKEND:+ and a Postfix}; a fault every ${EVERY} s held ${HOLD} s; backend_connect = ${CONNECT_TIMEOUT} s, backend_command = backend_data_end = ${BACKEND_TIMEOUT} s, down_after = 3, probe_interval = 0.25 s"
"$LOAD" run -t "127.0.0.1:$PORT_E" -c "$C" -m 10 -n "$N" -s 4096 --timeout 30 \
  "${LOOP[@]}" --outcomes "$WORK/outcomes.tsv" --id-prefix fr --chart "$CHART" --faults "$FAULTS" \
  --json -q >"$WORK/load.json" 2>"$WORK/load.err" &
LOAD_PID=$!
LOAD_T0=$(date +%s.%N)

# The faults, in turn; each held HOLD s, then the backend is restored.
fault() {
  case $1 in
    0) mark "kill a"; unsink a; sleep "$HOLD"; sink a ;;
    1) mark "SIGSTOP b"; kill -STOP "${SPID[b]}"; sleep "$HOLD"; kill -CONT "${SPID[b]}" ;;
    2) mark "a: 421 at RCPT"; unsink a; sink a -Q RCPT; sleep "$HOLD"; unsink a; sink a ;;
    3) mark "b: 450 at MAIL"; unsink b; sink b -r MAIL; sleep "$HOLD"; unsink b; sink b ;;
    4) mark "a: drop at DATA"; unsink a; sink a -q DATA; sleep "$HOLD"; unsink a; sink a ;;
    5) mark "b: drop after dot"; unsink b; sink b -q .; sleep "$HOLD"; unsink b; sink b ;;
    6) mark "kill b"; unsink b; sleep "$HOLD"; sink b ;;
    7) mark "SIGSTOP a"; kill -STOP "${SPID[a]}"; sleep "$HOLD"; kill -CONT "${SPID[a]}" ;;
    8) mark "a: slow DATA (1 s)"; unsink a; sink a -w 1; sleep "$HOLD"; unsink a; sink a ;;
    9) mark "postfix killed"; pf_stop; sleep "$HOLD"; pf_start ;;
    # Not in the default rotation: `postfix stop` lets an smtpd that serves
    # a pooled connection live on (FAULT_KINDS=10 to run it).
    10) mark "postfix stop"; postfix -c "$PF_DIR/conf" stop >>"$WORK/postfix.start.log" 2>&1 || true; sleep "$HOLD"; pf_start ;;
  esac
}
# FAULT_KINDS="0 5 9": only these kinds, in turn (default: all but 10).
if [ -n "${FAULT_KINDS:-}" ]; then
  read -r -a KINDS <<<"$FAULT_KINDS"
else
  KINDS=(0 1 2 3 4 5 6 7 8)
  [ -n "$PF_BACKEND" ] && KINDS+=(9)
fi
i=0
sleep "$EVERY"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  fault "${KINDS[$((i % ${#KINDS[@]}))]}"
  i=$((i + 1))
  rest=$(python3 -c "print(max(0.0, $EVERY - $HOLD))")
  sleep "$rest"
done
wait "$LOAD_PID" || true
forget "$LOAD_PID"
echo "faults applied: $i"

# Everything the backends stored is on disk once they answered; stop them.
for n in a b; do kill -CONT "${SPID[$n]}" 2>/dev/null || true; done
sleep 0.5
stop_pid "$HEALTH_PID"
forget "$HEALTH_PID"
curl -s "http://127.0.0.1:$PORT_ADM/metrics" >"$WORK/metrics.txt" || true
for n in a b; do stop_pid "${SPID[$n]}"; forget "${SPID[$n]}"; done
STORES=(--store "$STORE/a" --store "$STORE/b")
if [ -n "$PF_BACKEND" ]; then
  # What Postfix accepted is delivered from its queue: wait for it.
  for _ in $(seq 1 600); do [ "$(pf_queued)" = 0 ] && break; sleep 0.5; done
  echo "postfix: $(pf_queued) messages left in its queue; $(grep -c 'status=sent' "$PF_DIR/maillog") delivered"
  mkdir -p "$PF_DIR/mail/box"
  STORES+=(--store "$PF_DIR/mail/box")
fi

python3 - "$WORK/load.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m, l = r["messages"], r["latency_us"]["transaction"]
print(f"load: attempted {m['attempted']} accepted {m['accepted']} rejected {m['rejected']} failed {m['failed']} in {r['elapsed_s']:.1f} s ({r['msgs_per_sec']:.0f} msg/s); transaction p50 {l['p50']/1000:.1f} ms p99 {l['p99']/1000:.1f} ms max {l['max']/1000:.0f} ms")
print("final replies:", r["replies"].get("final", {}), "errors:", {k: v for k, v in r["errors"].items() if v}, "dropped by the generator (over --max-inflight):", m["dropped"])
if m["accepted"] * 2 < m["attempted"]:
    sys.exit("faultrun: fewer than half the messages got a 250: the faults took everything down, nothing to account for")
PY

# Health: how often each backend left rotation and how long it stayed out;
# messages slower than the connect timeout.
python3 - "$WORK/health.txt" "$FAULTS" "$WORK/outcomes.tsv" "$CONNECT_TIMEOUT" "$LOAD_T0" <<'PY'
import sys
from collections import Counter
health, faults, outcomes, ct, t0 = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
rows = []
for line in open(health):
    p = line.split()
    if len(p) >= 3:
        rows.append((float(p[0]), *p[1:]))
for i, name in ((1, "a"), (2, "b"), (3, "postfix")):
    if not rows or len(rows[0]) <= i:
        continue
    downs, outs, last, since = 0, [], "1", None
    for t, *v in rows:
        if len(v) < i:
            continue
        if v[i - 1] == "0" and last != "0":
            downs, since = downs + 1, t
        if v[i - 1] == "1" and last == "0" and since is not None:
            outs.append(t - since)
        last = v[i - 1]
    o = f", out of rotation {min(outs):.1f}-{max(outs):.1f} s each" if outs else ""
    print(f"health: backend {name} marked down {downs} times (smtp_edge_backend_up 1 -> 0), back up {len(outs)} times{o}")
fl = []
for line in open(faults):
    t, _, label = line.strip().partition(" ")
    fl.append((float(t) - t0, label))
rows = [l.split("\t") for l in open(outcomes) if l.strip()]
lat = sorted(float(r[4]) for r in rows)
slow = Counter()
for r in rows:
    if float(r[4]) >= ct:
        # The fault in effect when the message started.
        start = float(r[3]) - float(r[4])
        before = [label for t, label in fl if t <= start + 0.05]
        slow[before[-1] if before else "no fault yet"] += 1
print(f"messages slower than the backend connect timeout ({ct:g} s): {sum(slow.values())} of {len(lat)} (max {lat[-1]:.2f} s, p99.9 {lat[int(len(lat) * 0.999) - 1]:.3f} s); by the fault in effect when they started: {dict(slow)}")
PY
grep -E "marked down|back in rotation" "$WORK/edge.log" | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sed 's/^/edge log: /' | head -4 || true

echo
echo "accounting (smtp-load account):"
set +e
"$LOAD" account --outcomes "$WORK/outcomes.tsv" "${STORES[@]}" >"$WORK/account.txt"
rc=$?
cat "$WORK/account.txt"
set -e
echo "chart: $CHART"
if [ -n "${KEEP:-}" ]; then
  mkdir -p "$KEEP"
  # The copies of a duplicated message, and Postfix's log to follow one.
  grep -o '^  in .*' "$WORK/account.txt" | sed 's/^  in //' | while read -r f; do cp "$f" "$KEEP/dup.$(basename "$(dirname "$f")").$(basename "$f")"; done || true
  [ -z "$PF_BACKEND" ] || cp "$PF_DIR/maillog" "$KEEP/postfix.maillog"
  cp -r "$WORK"/outcomes.tsv "$WORK"/faults.txt "$WORK"/health.txt "$WORK"/load.json "$WORK"/edge.log "$WORK"/metrics.txt "$WORK"/sink.*.log "$KEEP"/ 2>/dev/null || true
  echo "kept: $KEEP"
fi
exit $rc

#!/usr/bin/env bash
# Scenario 7, admission policy under abuse: abusive sources are rate-limited
# while good sources keep their latency. smtp-edge enforces per-IP limits
# (20 messages/s, 30 connections/s, 2 sessions at once). Good senders: 4
# addresses, persistent connections, open loop at a modest rate (each well
# under every limit), first alone, then while an abusive closed loop (new
# connection per message, as fast as it goes) runs from 40 other addresses;
# then the same attack on a second smtp-edge without limits, for comparison.
# Reports the good senders' MAIL-to-final p50/p99, the abusers' attempts/s,
# accepted/s and refusals by reply code, and smtp-edge's CPU.
# Usage: policy.sh [SECONDS_PER_PHASE=5] [GOOD_RATE=40] [ABUSE_CONNECTIONS=200]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
RATE=${2:-40}
ABUSE_CONNS=${3:-200}
GOOD=127.0.0.2-127.0.0.5
ABUSE=127.0.1.2-127.0.1.41
POLICY='[policy.limits.message_rate]
action = "reject"
per_ip = { count = 20, period = 1 }
[policy.limits.connection_rate]
action = "reject"
per_ip = { count = 30, period = 1 }
[policy.limits.concurrency]
action = "reject"
per_ip = 2'
setup none "$POLICY"
LIMITED=$PROXY
LIMITED_PID=$EDGE_PID
OPEN=$(free_port)
start_edge "$OPEN" "$SINK"
OPEN_PID=$EDGE_PID
export ALLOW_INCOMPLETE=1

# good OUT PORT PID: the good senders' open loop, watching smtp-edge's CPU.
good() {
  load "$1" -t "127.0.0.1:$2" --bind "$GOOD" -c 4 -m 0 --rate "$RATE" -d "$SECS" --warmup 1 --watch-pid "$3"
}

# attack OUT PORT PID: the good senders while the abusers run (report in
# OUT.abuse); the abusers start first and stop last.
attack() {
  load "$1.abuse" -t "127.0.0.1:$2" --bind "$ABUSE" -c "$ABUSE_CONNS" -m 1 -d "$((SECS + 1))" --warmup 1 &
  local abuse=$!
  sleep 1
  good "$1" "$2" "$3"
  wait "$abuse"
}


lost() { echo "$(field "$1" messages.rejected)/$(field "$1" messages.failed)/$(field "$1" messages.dropped)"; }
cores() { ratio "$(field "$1" server.cpu_s)" "$(field "$1" elapsed_s)"; }
attempts() { ratio "$(field "$1" messages.attempted)" "$(field "$1" elapsed_s)"; }
accepted() { field "$1" msgs_per_sec; }

good "$WORK/base.json" "$LIMITED" "$LIMITED_PID"
attack "$WORK/attack.json" "$LIMITED" "$LIMITED_PID"
attack "$WORK/open.json" "$OPEN" "$OPEN_PID"

B=$WORK/base.json A=$WORK/attack.json O=$WORK/open.json
f='%-28s %12s %14s %7s %18s\n'
# row LABEL KEY.PATH [UNIT]: baseline, under attack, their ratio, no limits.
row() {
  local b a o
  b=$(field "$B" "$2"); a=$(field "$A" "$2"); o=$(field "$O" "$2")
  printf "$f" "$1" "$b${3:-}" "$a${3:-}" "$(ratio "$a" "$b")" "$o${3:-}"
}
printf "$f" "good: $RATE msgs/s, 4 IPs" baseline "under attack" ratio "attack, no limits"
row "good MAIL-to-final p50" latency_us.mail_to_final.p50 us
row "good MAIL-to-final p99" latency_us.mail_to_final.p99 us
row "good scheduled-to-final p99" latency_us.scheduled_to_final.p99 us
row "good accepted msgs/s" msgs_per_sec
printf "$f" "good rejected/failed/dropped" "$(lost "$B")" "$(lost "$A")" "" "$(lost "$O")"
printf "$f" "edge CPU (cores)" "$(cores "$B")" "$(cores "$A")" "" "$(cores "$O")"
printf "$f" "abusive attempts/s" "" "$(attempts "$A.abuse")" "" "$(attempts "$O.abuse")"
printf "$f" "abusive accepted/s" "" "$(accepted "$A.abuse")" "" "$(accepted "$O.abuse")"
echo "good senders' non-2xx replies: baseline: $(codes "$B"); under attack: $(codes "$A"); no limits: $(codes "$O")"
echo "abusers ($ABUSE_CONNS connections, 40 IPs, new connection per message), refused by code: $(codes "$A.abuse")"
echo "abusers without limits: $(codes "$O.abuse")"

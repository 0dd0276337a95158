#!/usr/bin/env bash
# Outside reference with Postfix's own tools, the method of PEERS.md:
# smtp-source into smtp-sink directly and through smtp-edge (smtp-edge in
# front of the same smtp-sink), alternated; msgs/s and the ratio, for a new
# connection per message and for persistent connections (-d). A run counts
# only if smtp-source exits 0.
# Usage: postfix-reference.sh [MESSAGES=20000] [SESSIONS=50] [REPEATS=3]
source "$(dirname "$0")/../lib.sh"
MSGS=${1:-20000}
SESS=${2:-50}
REPS=${3:-3}
command -v smtp-source >/dev/null || { echo "smtp-source not installed (apt-get install postfix)" >&2; exit 1; }
build
SINK=$(free_port)
smtp-sink -u nobody 127.0.0.1:"$SINK" 2000 >"$WORK/smtp-sink.log" 2>&1 &
PIDS+=("$!")
wait_port "$SINK"
PROXY=$(free_port)
start_edge "$PROXY" "$SINK"
machine
# rate PORT [-d]: messages/s of one smtp-source run.
rate() {
  local port=$1
  shift
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source "$@" -s "$SESS" -l 4096 -m "$MSGS" -f a@example.org -t b@example.org "127.0.0.1:$port"
  t1=$(date +%s.%N)
  python3 -c "print(round($MSGS/($t1-$t0),1))"
}
printf '%-12s %10s %10s %7s\n' mode direct/s edge/s ratio
for mode in new persistent; do
  flag=(); [ "$mode" = persistent ] && flag=(-d)
  d=(); e=()
  for _ in $(seq 1 "$REPS"); do
    d+=("$(rate "$SINK" "${flag[@]}")")
    e+=("$(rate "$PROXY" "${flag[@]}")")
  done
  dm=$(median "${d[@]}"); em=$(median "${e[@]}")
  printf '%-12s %10s %10s %7s\n' "$mode" "$dm" "$em" "$(ratio "$em" "$dm")"
done

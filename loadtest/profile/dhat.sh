#!/usr/bin/env bash
# dhat.sh NAME [N1=4000] [N2=14000]: the heap blocks a relayed message
# touches, by allocation site, under valgrind's DHAT: smtp-edge built with
# the system allocator (DHAT sees no other), one worker, CONNS sessions
# (default 400), persistent, 4 KiB, pipelining. Two runs, of N1 and N2
# messages, so that dhat_sites.py can take the first from the second: what
# is left is per message, without the start-up (sessions and backend
# connections made, the pool filled).
# Build it first and keep it aside (the next plain build replaces it):
#   cargo build --release -p smtp-edge --bin smtp-edge --features system-alloc
#   cp target/release/smtp-edge /tmp/smtp-edge-dhat
#   EDGE_BIN=/tmp/smtp-edge-dhat loadtest/profile/dhat.sh NAME
# Then: dhat_sites.py $PROF_DIR/NAME/dhat.N1.out N1 $PROF_DIR/NAME/dhat.N2.out N2
set -eu
NAME=$1; N1=${2:-4000}; N2=${3:-14000}; EXTRA=""; LOAD_ON=""
here=$(cd "$(dirname "$0")" && pwd)
: "${EDGE_BIN:?EDGE_BIN=/path/to/smtp-edge built with --features system-alloc}"
source "$here/common.sh"
for n in "$N1" "$N2"; do
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=dhat --dhat-out-file="$W/dhat.$n.out" \
    "$EDGE" --config "$W/edge.toml" > "$W/edge.$n.log" 2>&1 & EPID=$!
  trap 'kill $EPID $SPID 2>/dev/null || true' EXIT
  wait_edge
  "$R/smtp-load" run -t 127.0.0.1:$EP -c "${CONNS:-400}" -m 0 -n "$n" -s 4096 -q > "$W/load.$n.txt" 2>&1
  sleep 1
  # SIGTERM: smtp-edge stops cleanly and DHAT writes its file at exit.
  kill -TERM $EPID; wait $EPID 2>/dev/null || true
  grep -q "^result    OK" "$W/load.$n.txt" || { echo "dhat.sh: the load of $n failed: $W/load.$n.txt" >&2; exit 1; }
done
kill $SPID 2>/dev/null || true; wait 2>/dev/null || true
echo "$NAME: $W/dhat.$N1.out $N1 $W/dhat.$N2.out $N2"
